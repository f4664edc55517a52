"""Ingestion jobs over HTTP against a real server: an upload returns at once with a job that
reports its progress (JSON and Server-Sent Events), can be cancelled leaving the knowledge
base consistent, and, killed by a crash, reads as failed (interrupted) and can be retried."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from settings import Settings
from tests.fixtures import make_chinese_pdf
from tests.live_server import LiveServer, free_port, serving_state
from tests.test_replicas import wait_for

FINAL = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def state(tmp_path_factory, models_dir, embedder):
    # small batches: a job commits as it goes, so a cancel has something to keep
    settings = Settings(home=tmp_path_factory.mktemp("jobs-home"), models_dir=models_dir, default_max_tokens=8, ingest_batch_chunks=32)
    with serving_state(settings, embedder, {}) as state:
        yield state


@pytest.fixture(scope="module")
def api(state):
    with LiveServer.serving(state) as live:
        yield f"{live.url}/v1/knowledge_bases"


def many_files(count: int, prefix: str = "规章") -> list[tuple[str, tuple[str, bytes, str]]]:
    """``count`` distinct text files, long enough that embedding them takes a while."""
    files = []
    for i in range(count):
        body = "\n\n".join(f"{prefix}第{i}号文件第{j}条：编号 {i * 1000 + j} 的设备每 {j + 2} 个月检修一次，责任人为第 {i % 7} 组。" * 3 for j in range(12))
        files.append(("files", (f"{prefix}-{i:03}.txt", body.encode(), "text/plain")))
    return files


def follow(url: str) -> list[dict]:
    """Every job event of the SSE stream, until the job ends."""
    seen = []
    with httpx.stream("GET", url, timeout=300) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                seen.append(json.loads(line[5:]))
    return seen


def wait_until(api: str, kb: str, job_id: str, predicate, seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = httpx.get(f"{api}/{kb}/jobs/{job_id}").json()
        if predicate(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got there: {job}")


def test_an_upload_returns_a_job_that_reports_progress_until_done(api, tmp_path):
    pdf = make_chinese_pdf(tmp_path / "手册.pdf")
    files = [
        ("files", ("手册.pdf", pdf.read_bytes(), "application/pdf")),
        ("files", ("broken.pdf", b"%PDF-1.4 not really", "application/pdf")),
        *many_files(3),
    ]
    started = time.monotonic()
    response = httpx.post(f"{api}/任务/documents", files=files, timeout=60)
    assert response.status_code == 202, response.text
    job = response.json()
    assert time.monotonic() - started < 10 and job["state"] in ("queued", "running")
    assert job["files_total"] == 5 and [f["name"] for f in job["files"]][:2] == ["手册.pdf", "broken.pdf"]
    events = follow(f"{api}/任务/jobs/{job['id']}/events")
    states = [e["state"] for e in events]
    assert states[-1] == "done" and "failed" not in states[:-1]
    done = [e["files_done"] for e in events]
    assert done == sorted(done) and done[-1] == 5
    final = events[-1]
    assert final["error"] == "1 of 5 files failed" and final["chunks_embedded"] == final["chunks_total"] > 0
    by_name = {f["name"]: f for f in final["files"]}
    assert by_name["broken.pdf"]["state"] == "failed" and "malformed PDF" in by_name["broken.pdf"]["error"]
    assert by_name["手册.pdf"]["state"] == "ingested" and by_name["手册.pdf"]["chunks"] > 0
    assert httpx.get(f"{api}/任务/jobs/{job['id']}").json() == final
    assert [j["id"] for j in httpx.get(f"{api}/任务/jobs").json()["data"]] == [job["id"]]
    documents = {d["path"]: d for d in httpx.get(f"{api}/任务/documents").json()["data"]}
    assert documents["broken.pdf"]["status"] == "failed" and documents["手册.pdf"]["status"] == "ok"


def test_unknown_jobs_and_knowledge_bases_are_404_with_the_parameter_named(api):
    missing = httpx.get(f"{api}/任务/jobs/job-nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "job_id"
    assert httpx.get(f"{api}/任务/jobs/job-nope/events").status_code == 404
    assert httpx.delete(f"{api}/任务/jobs/job-nope").status_code == 404


def test_cancelling_keeps_what_was_committed_and_nothing_half_written(api, state):
    first = httpx.post(f"{api}/取消/documents", files=many_files(80, "甲"), timeout=120).json()
    queued = httpx.post(f"{api}/取消/documents", files=many_files(2, "乙"), timeout=60).json()
    assert queued["state"] == "queued"
    cancelled = httpx.delete(f"{api}/取消/jobs/{queued['id']}").json()
    assert cancelled["state"] == "cancelled"
    deadline = time.monotonic() + 120
    while not httpx.get(f"{api}/取消/documents").json().get("data") and time.monotonic() < deadline:
        time.sleep(0.1)  # until the first batch is committed
    httpx.delete(f"{api}/取消/jobs/{first['id']}").raise_for_status()
    final = wait_until(api, "取消", first["id"], lambda j: j["state"] in FINAL)
    assert final["state"] == "cancelled"
    ingested = [f["name"] for f in final["files"] if f["state"] == "ingested"]
    assert 0 < len(ingested) < 80 and all(f["state"] in ("ingested", "cancelled") for f in final["files"])
    documents = {d["path"] for d in httpx.get(f"{api}/取消/documents").json()["data"]}
    assert documents == set(ingested)  # every file it reports ingested, and no other
    uploads = state.settings.home / "uploads" / "取消"
    assert {p.name for p in uploads.iterdir()} == documents  # files it never committed are gone
    assert not (state.settings.home / "jobs" / queued["id"]).exists()
    hits = httpx.post(f"{api}/取消/search", json={"query": f"{ingested[0].split('-')[0]}第{int(ingested[0][2:5])}号文件", "top_k": 1})
    assert hits.status_code == 200 and hits.json()["data"]
    again = httpx.post(f"{api}/取消/documents", files=many_files(1, "丙"), timeout=60).json()
    assert wait_until(api, "取消", again["id"], lambda j: j["state"] in FINAL)["state"] == "done"


def test_chat_answers_while_a_job_ingests(api, state):
    job = httpx.post(f"{api}/忙碌/documents", files=many_files(40, "丁"), timeout=120).json()
    wait_until(api, "忙碌", job["id"], lambda j: j["state"] == "running")
    base = api.removesuffix("/knowledge_bases")
    started = time.monotonic()
    answer = httpx.post(
        f"{base}/chat/completions",
        json={"model": state.generator.model_id, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4},
        timeout=120,
    )
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    assert httpx.get(f"{api}/忙碌/jobs/{job['id']}").json()["state"] == "running"  # answered before the job ended
    assert time.monotonic() - started < 60
    wait_until(api, "忙碌", job["id"], lambda j: j["state"] in FINAL, seconds=300)


def test_a_job_killed_by_a_crash_reads_as_interrupted_and_its_files_can_be_retried(tmp_path, models_dir, generator_model_path):
    env = {**os.environ, "ZHIKU_HOME": str(tmp_path / "home"), "ZHIKU_MODELS_DIR": str(models_dir), "ZHIKU_DEFAULT_MAX_TOKENS": "8"}

    def serve() -> tuple[subprocess.Popen, str]:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.serve", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200, "rag serve", 240, process)
        return process, f"{url}/v1/knowledge_bases"

    process, api = serve()
    try:
        job = httpx.post(f"{api}/崩溃/documents", files=many_files(60, "戊"), timeout=120).json()
        wait_until(api, "崩溃", job["id"], lambda j: j["files_done"] >= 1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    process, api = serve()
    try:
        interrupted = httpx.get(f"{api}/崩溃/jobs/{job['id']}").json()
        assert interrupted["state"] == "failed" and interrupted["error"].startswith("interrupted")
        retried = httpx.post(f"{api}/崩溃/jobs/{job['id']}/retry", timeout=60)
        assert retried.status_code == 202 and retried.json()["retry_of"] == job["id"]
        final = wait_until(api, "崩溃", retried.json()["id"], lambda j: j["state"] in FINAL, seconds=300)
        assert final["state"] == "done" and final["error"] is None
        documents = httpx.get(f"{api}/崩溃/documents").json()["data"]
        assert sorted(d["path"] for d in documents) == [f"戊-{i:03}.txt" for i in range(60)]
        assert all(d["status"] == "ok" and d["chunk_count"] > 0 for d in documents)
        again = httpx.post(f"{api}/崩溃/jobs/{job['id']}/retry", timeout=60)
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_retryable"
    finally:
        process.terminate()
        process.wait(60)
