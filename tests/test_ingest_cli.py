"""The `ingest` command as a user runs it: a real process, real files, JSON output, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rag.retrieval import Retriever

COMMANDS = ["add", "list", "remove", "drop", "rebuild", "search"]


@pytest.fixture
def cli(settings, embedder):
    env = {**os.environ, "ZHIKU_HOME": str(settings.home), "ZHIKU_MODELS_DIR": str(settings.model_cache)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cli.ingest", *args], env=env, capture_output=True, text=True, timeout=300
        )

    return run


def test_every_command_has_help(cli):
    assert cli("--help").returncode == 0
    for command in COMMANDS:
        result = cli(command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout, command


def test_add_list_search_remove_drop(cli, tmp_path, settings, embedder):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "退款.txt").write_text("购买后七天内可以申请无理由退款，退款三个工作日内原路退回。", encoding="utf-8")
    (docs / "weather.md").write_text("# Weather\n\nIt is sunny in Beijing today, with a light breeze in the evening.", encoding="utf-8")
    (docs / "broken.txt").write_bytes(b"\x00\x01\x02\xff" * 100)
    (docs / "slides.key").write_bytes(b"not supported")

    added = cli("add", str(docs), "--kb", "手册", "--json")
    assert added.returncode == 1, added.stderr  # one file failed, the rest ingested
    outcomes = {os.path.basename(o["path"]): o for o in json.loads(added.stdout)}
    assert outcomes["退款.txt"]["outcome"] == "ingested" and outcomes["退款.txt"]["chunks"] >= 1
    assert outcomes["broken.txt"]["outcome"] == "failed" and outcomes["broken.txt"]["error"]
    assert outcomes["slides.key"]["outcome"] == "skipped"

    again = cli("add", str(docs), "--kb", "手册", "--json")
    assert {o["outcome"] for o in json.loads(again.stdout) if o["path"].endswith(".txt") and "退款" in o["path"]} == {"unchanged"}

    kbs = json.loads(cli("list", "--json").stdout)
    assert [k["name"] for k in kbs] == ["手册"] and kbs[0]["documents"] == 4

    documents = {os.path.basename(d["path"]): d for d in json.loads(cli("list", "--kb", "手册", "--json").stdout)}
    assert documents["退款.txt"]["status"] == "ok" and documents["退款.txt"]["chunks"] >= 1
    assert documents["broken.txt"]["status"] == "failed" and "binary" in documents["broken.txt"]["error"]
    assert documents["slides.key"]["status"] == "skipped"
    assert all({"path", "status", "chunks", "error"} <= d.keys() for d in documents.values())

    found = json.loads(cli("search", "怎么退款", "--kb", "手册", "--top-k", "2", "--json").stdout)
    assert len(found) == 2 and os.path.basename(found[0]["source"]) == "退款.txt"
    assert {"text", "source", "page", "score", "rank_score", "chunk_ids"} <= found[0].keys()
    assert found[0]["rank_score"] >= found[1]["rank_score"]
    # the same passages chat retrieves (hybrid, merged), not a second search
    retriever = Retriever.from_settings(settings, embedder=embedder)
    try:
        assert found == json.loads(json.dumps([p.to_dict() for p in retriever.retrieve("手册", "怎么退款", top_k=2)]))
    finally:
        retriever.close()
    dense = json.loads(cli("search", "怎么退款", "--kb", "手册", "--top-k", "2", "--dense-only", "--json").stdout)
    assert len(dense) == 2 and all(len(p["chunk_ids"]) == 1 and p["rank_score"] == p["score"] for p in dense)
    assert [p["score"] for p in dense] == sorted((p["score"] for p in dense), reverse=True)
    too_strict = cli("search", "怎么退款", "--kb", "手册", "--score-threshold", "0.99", "--json")
    assert too_strict.returncode == 0 and json.loads(too_strict.stdout) == []

    assert cli("remove", str(docs / "weather.md"), "--kb", "手册").returncode == 0
    documents = json.loads(cli("list", "--kb", "手册", "--json").stdout)
    assert not any(d["path"].endswith("weather.md") for d in documents)

    assert cli("drop", "--kb", "手册", "--yes").returncode == 0
    assert json.loads(cli("list", "--json").stdout) == []


def test_usage_errors_exit_2_with_a_clear_message(cli, tmp_path):
    unknown = cli("search", "hello", "--kb", "missing")
    assert unknown.returncode == 2 and "does not exist" in unknown.stderr and "Traceback" not in unknown.stderr
    bad_name = cli("add", str(tmp_path), "--kb", "../evil")
    assert bad_name.returncode == 2 and "invalid knowledge-base name" in bad_name.stderr
    empty_name = cli("add", str(tmp_path), "--kb", "")  # not silently the default knowledge base
    assert empty_name.returncode == 2 and "invalid knowledge-base name ''" in empty_name.stderr
    missing_path = cli("add", str(tmp_path / "nope"))
    assert missing_path.returncode == 2
    bad_overlap = cli("add", str(tmp_path), "--chunk-size", "100", "--chunk-overlap", "200")
    assert bad_overlap.returncode == 2 and "chunk_overlap" in bad_overlap.stderr and "Traceback" not in bad_overlap.stderr


@pytest.mark.parametrize(
    "ending, code, stderr",
    [("raise SystemExit(3)", 3, ""), ("raise SystemExit('bad input')", 1, "bad input"), ("pass", 0, "")],
)
def test_commands_that_loaded_torch_exit_with_their_code_and_all_their_output(ending, code, stderr):
    # models.torch_device.run_and_exit skips interpreter teardown once torch is loaded
    script = (
        "import torch\nfrom models.torch_device import run_and_exit\n"
        f"def app():\n    print('字' * 200_000)\n    {ending}\nrun_and_exit(app)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert done.returncode == code
    assert done.stdout == "字" * 200_000 + "\n"
    assert stderr in done.stderr
