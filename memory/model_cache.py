"""Finding models offline: the local Hugging Face cache, and the marker that says a
bundled model was completely materialised. Shared by the embedder (memory/) and
the generator (rag/)."""

from __future__ import annotations

import json
import os
from pathlib import Path

MARKER_FILE = "zhiku.json"


class NotInCache(LookupError):
    """A hub id that is not in the local Hugging Face cache."""


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
