"""Two `rag serve` processes on different ports, configured with the same Milvus (a real
`milvus-lite server` process): what one changes, the other serves at its next request.

The replicas share ZHIKU_HOME's path, as replicas on different machines do when each has the
same home (an uploaded file is known by its path there); none of them holds knowledge-base
state of its own: documents, chunks, vectors and the catalogue are all in Milvus."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.live_server import free_port

pytestmark = pytest.mark.slow

KB = "共享手册"
FIRST = "值班制度\n\n机房的值班电话是 8848-1024，夜间故障请先拨打值班电话。"
SECOND = "值班制度\n\n机房的值班电话改为 6300-7788，夜间故障请先拨打值班电话。"


def wait_for(check, what: str, seconds: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {process.stderr.read().decode()[-3000:]}")
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not start in {seconds} s")


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    port = free_port()
    data = tmp_path_factory.mktemp("milvus-server")
    server = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, "milvus-lite server", 60, server)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)


@pytest.fixture(scope="module")
def replicas(milvus_uri, tmp_path_factory, models_dir, generator_model_path):
    home = tmp_path_factory.mktemp("replica-home")
    env = {
        **os.environ,
        "ZHIKU_HOME": str(home),
        "ZHIKU_MODELS_DIR": str(models_dir),
        "ZHIKU_VECTOR_STORE": "milvus",
        "ZHIKU_MILVUS_URI": milvus_uri,
        "ZHIKU_DEFAULT_MAX_TOKENS": "8",
    }
    ports = [free_port(), free_port()]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "cli.serve", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for port in ports
    ]
    try:
        for port, process in zip(ports, processes):
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200, f"rag serve on {port}", 240, process)
        yield [f"http://127.0.0.1:{port}/v1" for port in ports]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)


def upload(api: str, text: str) -> httpx.Response:
    files = [("files", ("值班.txt", text.encode("utf-8"), "text/plain"))]
    return httpx.post(f"{api}/knowledge_bases/{KB}/documents", params={"wait": "true"}, files=files, timeout=120)


def search(api: str, query: str) -> httpx.Response:
    return httpx.post(f"{api}/knowledge_bases/{KB}/search", json={"query": query, "top_k": 3}, timeout=60)


def test_what_one_replica_changes_the_other_serves(replicas):
    a, b = replicas
    assert upload(a, FIRST).json()["data"][0]["outcome"] == "ingested"

    listed = httpx.get(f"{b}/knowledge_bases", timeout=30).json()["data"]
    assert [(kb["name"], kb["documents"], kb["backend"]) for kb in listed] == [(KB, 1, "milvus")]
    found = search(b, "机房值班电话是多少").json()["data"]
    assert found and "8848-1024" in found[0]["text"] and found[0]["source"] == "值班.txt"

    client = openai.OpenAI(base_url=b, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "机房值班电话是多少？"}],
        extra_body={"knowledge_base": KB},
    )
    sources = reply.model_dump()["sources"]
    assert sources and "8848-1024" in sources[0]["text"]

    assert upload(b, SECOND).json()["data"][0]["outcome"] == "ingested"  # the same file, changed, through the other one
    documents = httpx.get(f"{a}/knowledge_bases/{KB}/documents", timeout=30).json()["data"]
    assert [d["path"] for d in documents] == ["值班.txt"]
    texts = [p["text"] for p in search(a, "机房值班电话是多少").json()["data"]]
    assert any("6300-7788" in t for t in texts) and not any("8848-1024" in t for t in texts)

    assert httpx.delete(f"{a}/knowledge_bases/{KB}", timeout=60).status_code == 200
    assert httpx.get(f"{b}/knowledge_bases", timeout=30).json()["data"] == []
    gone = search(b, "机房值班电话是多少")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "knowledge_base_not_found"
