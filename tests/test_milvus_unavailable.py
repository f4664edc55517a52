"""A Milvus that is down: a clear 503 from every API route that needs it (real server, real
`openai` client), a one-line error and exit code 1 from the CLI, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import openai
import pytest

from settings import Settings
from tests.live_server import LiveServer, free_port, serving_state


@pytest.fixture(scope="module")
def down_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture(scope="module")
def api(tmp_path_factory, models_dir, embedder, down_uri):
    settings = Settings(
        home=tmp_path_factory.mktemp("milvus-down-home"),
        models_dir=models_dir,
        vector_store="milvus",
        milvus_uri=down_uri,
        default_max_tokens=8,
    )
    with serving_state(settings, embedder, {}) as state, LiveServer.serving(state) as live:
        yield f"{live.url}/v1"


def assert_unavailable(response: httpx.Response, down_uri: str) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "knowledge_base_unavailable" and down_uri in error["message"]
    assert "Traceback" not in response.text and response.headers["retry-after"] == "5"


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/knowledge_bases", None),
        ("POST", "/knowledge_bases", {"name": "手册"}),
        ("GET", "/knowledge_bases/手册/documents", None),
        ("POST", "/knowledge_bases/手册/search", {"query": "退款"}),
        ("DELETE", "/knowledge_bases/手册", None),
    ],
)
def test_knowledge_base_routes_answer_503(api, down_uri, method, path, body):
    assert_unavailable(httpx.request(method, f"{api}{path}", json=body, timeout=60), down_uri)


def test_chat_with_a_knowledge_base_is_a_503_for_the_openai_client(api, down_uri):
    client = openai.OpenAI(base_url=api, api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "怎么退款？"}], extra_body={"knowledge_base": "手册"}
        )
    assert raised.value.status_code == 503
    assert raised.value.body["code"] == "knowledge_base_unavailable"


def test_chat_without_a_knowledge_base_still_answers(api):
    client = openai.OpenAI(base_url=api, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize("args", [["list"], ["add", "{docs}", "--kb", "手册", "--backend", "milvus"], ["search", "退款", "--kb", "手册"]])
def test_the_cli_says_milvus_is_down_in_one_line(tmp_path, models_dir, down_uri, args):
    (tmp_path / "a.txt").write_text("退款政策：七天内可以退款。", encoding="utf-8")
    env = {**os.environ, "ZHIKU_HOME": str(tmp_path / "home"), "ZHIKU_MODELS_DIR": str(models_dir), "ZHIKU_MILVUS_URI": down_uri}
    argv = [a.replace("{docs}", str(tmp_path / "a.txt")) for a in args]
    result = subprocess.run([sys.executable, "-m", "cli.ingest", *argv], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr and down_uri in result.stderr
    assert "error:" in result.stderr and "ZHIKU_MILVUS_URI" in result.stderr
