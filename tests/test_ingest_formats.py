"""A folder of every format, with one broken file of each type, through `ingest add` and
through the HTTP upload: the same files ingested, exactly the broken ones failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests import format_fixtures as ff
from tests.live_server import LiveServer, serving_state

BROKEN = {
    "加密.docx": lambda d: ff.make_encrypted_office(d / "加密.docx"),
    "旧格式.doc": lambda d: ff.make_encrypted_office(d / "旧格式.doc"),
    "截断.xlsx": lambda d: ff.make_truncated_zip(d / "截断.xlsx", ff.make_xlsx(d / ".good.xlsx")),
    "不是幻灯片.pptx": lambda d: ff.make_zip_without_parts(d / "不是幻灯片.pptx"),
    "版权保护.epub": lambda d: ff.make_drm_epub(d / "版权保护.epub", ff.make_epub(d / ".good.epub")),
    "乱码.html": lambda d: _write(d / "乱码.html", b"\x00\xff\xfe\x01" * 500),
    "乱码.csv": lambda d: _write(d / "乱码.csv", b"\x00\x01\x02" * 300),
    "坏.json": lambda d: _write(d / "坏.json", '{"a": 1,,}'.encode()),
    "坏.jsonl": lambda d: _write(d / "坏.jsonl", b'{"a": 1}\n{"b": \n'),
    "坏图.png": lambda d: _write(d / "坏图.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
}
GOOD = {
    "制度.docx": ff.make_docx,
    "报价.xlsx": ff.make_xlsx,
    "汇报.pptx": ff.make_pptx,
    "手册.epub": ff.make_epub,
    "通知.html": ff.make_html,
    "人口.csv": ff.make_csv,
    "人口.tsv": lambda p: ff.make_csv(p, "\t"),
    "问答.json": ff.make_json,
    "问答.jsonl": ff.make_jsonl,
    "说明.txt": lambda p: _write(p, "这是一个普通的文本文件，用来确认旧格式照常读入。".encode()),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    folder = tmp_path / "mixed"
    work = tmp_path / "work"
    folder.mkdir()
    work.mkdir()
    for name, make in GOOD.items():
        make(folder / name)
    for name, make in BROKEN.items():
        make(work)
        os.replace(work / name, folder / name)
    return folder


def outcomes_by_name(outcomes: list[dict]) -> dict[str, dict]:
    return {Path(o["path"]).name: o for o in outcomes}


def check_outcomes(outcomes: dict[str, dict]) -> None:
    assert {name for name, o in outcomes.items() if o["outcome"] == "failed"} == set(BROKEN)
    assert {name for name, o in outcomes.items() if o["outcome"] == "ingested"} == set(GOOD)
    assert all(outcomes[name]["chunks"] >= 1 for name in GOOD)
    assert outcomes["加密.docx"]["error"].startswith("encrypted (password-protected)")
    assert "convert it to .docx" in outcomes["旧格式.doc"]["error"]
    assert outcomes["版权保护.epub"]["error"] == "encrypted (DRM-protected e-book)"


def test_mixed_folder_through_ingest_add(mixed_folder, settings, embedder):
    env = {**os.environ, "ZHIKU_HOME": str(settings.home), "ZHIKU_MODELS_DIR": str(settings.model_cache)}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "cli.ingest", *args], env=env, capture_output=True, text=True, timeout=600
    )
    added = run("add", str(mixed_folder), "--kb", "混合", "--json")
    assert added.returncode == 1, added.stderr
    check_outcomes(outcomes_by_name(json.loads(added.stdout)))
    listed = outcomes_by_name(json.loads(run("list", "--kb", "混合", "--json").stdout))
    assert {n for n, d in listed.items() if d["status"] == "failed"} == set(BROKEN)
    assert all(d["ocr_pages"] == 0 for d in listed.values())  # nothing here needed OCR
    found = json.loads(run("search", "H100 的单价是多少", "--kb", "混合", "--top-k", "3", "--json").stdout)
    assert any("单价（元）: 230000" in p["text"] for p in found)


def test_mixed_folder_through_http_upload(mixed_folder, settings, embedder, generator_model_path):
    with serving_state(settings, embedder, {}) as state, LiveServer.serving(state) as server:
        assert httpx.post(f"{server.url}/v1/knowledge_bases", json={"name": "混合"}).status_code == 201
        files = [("files", (path.name, path.read_bytes(), "application/octet-stream")) for path in sorted(mixed_folder.iterdir())]
        response = httpx.post(f"{server.url}/v1/knowledge_bases/混合/documents", files=files, timeout=600)
        check_outcomes(outcomes_by_name(upload_outcomes(server.url, "混合", response)))


def upload_outcomes(url: str, kb: str, response: httpx.Response) -> list[dict]:
    """The per-file outcomes of an upload: in its answer, or in its ingest job once that has finished."""
    if response.status_code == 200:
        return response.json()["data"]
    assert response.status_code == 202, response.text
    job = response.json()
    deadline = time.monotonic() + 600
    while job["finished"] is None and time.monotonic() < deadline:
        time.sleep(0.5)
        job = httpx.get(f"{url}/v1/knowledge_bases/{kb}/jobs/{job['id']}").json()
    assert job["finished"] is not None, job
    return job["outcomes"]
