"""Clients that vanish: whatever stage their request is at (waiting for a batch
slot, retrieving, prefilling, decoding; streamed or not), the server drops the
work within a decode step and the next request is served as on an idle server.

Clients here are raw sockets, closed at a chosen moment, so the stage is exact.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from settings import Settings
from tests.live_server import LiveServer, serving_state

DOC = "Serving zhiku\n\nStart the server with rag serve. It listens on port 8000 by default.\n\nThe lighthouse keeper's cat is named Mochi."
STORY = [{"role": "user", "content": "Tell a very long story about a lighthouse."}]


@pytest.fixture(scope="module")
def state(models_dir, embedder, tmp_path_factory):
    docs = tmp_path_factory.mktemp("disconnect-docs")
    (docs / "serving.md").write_text(DOC, encoding="utf-8")
    settings = Settings(home=tmp_path_factory.mktemp("disconnect-home"), models_dir=models_dir, generator_max_batch_size=2)
    with serving_state(settings, embedder, {"docs": docs}) as state:
        yield state


@pytest.fixture(scope="module")
def server(state):
    with LiveServer.serving(state) as live:
        yield live


def send_and_keep(server, body: dict) -> socket.socket:
    """POST ``body`` on a raw connection and return it unread; closing it is the client vanishing."""
    payload = json.dumps(body).encode()
    connection = socket.create_connection(("127.0.0.1", server.port))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    connection.sendall(head + payload)
    return connection


def story(state, **extra) -> dict:
    return {"model": state.generator.model_id, "messages": STORY, "max_tokens": 400, "temperature": 0, "knowledge_base": None, **extra}


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def generator_idle(state) -> bool:
    stats = state.generator.stats()
    return stats.running == 0 and stats.queue_depth == 0


def short_answer_seconds(server, state) -> float:
    body = {"model": state.generator.model_id, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0}
    started = time.monotonic()
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200
    return time.monotonic() - started


@pytest.fixture
def idle_seconds(server, state) -> float:
    short_answer_seconds(server, state)  # warm
    return short_answer_seconds(server, state)


def requests_served(state) -> int:
    time.sleep(0.1)  # the worker counts a finished request just after sending its last event
    return state.generator.stats().requests_served


def assert_freed(server, state, idle_seconds: float) -> None:
    # Freed within about one prefill or decode step, far short of the story's 400 tokens (~50
    # short answers): the bound scales with this machine's speed under its current load.
    assert wait_for(lambda: generator_idle(state), timeout=1.0 + 2 * idle_seconds), state.generator.stats()
    assert short_answer_seconds(server, state) < 2 * idle_seconds + 0.5


@pytest.mark.parametrize("stream", [False, True])
def test_clients_gone_while_waiting_for_a_batch_slot(server, state, idle_seconds, stream):
    runners = [send_and_keep(server, story(state, stream=True)) for _ in range(2)]  # the batch is full
    assert wait_for(lambda: state.generator.stats().running == 2)
    waiting = [send_and_keep(server, story(state, stream=stream)) for _ in range(3)]
    assert wait_for(lambda: state.generator.stats().queue_depth == 3)
    for connection in waiting:
        connection.close()
    assert wait_for(lambda: state.generator.stats().queue_depth == 0, timeout=1.0)
    for connection in runners:
        connection.close()
    assert_freed(server, state, idle_seconds)


def test_clients_gone_while_their_retrieval_waits(server, state, idle_seconds, monkeypatch):
    prepared = []
    real_prepare = state.chat.prepare_now
    monkeypatch.setattr(state.chat, "prepare_now", lambda turn: prepared.append(turn) or real_prepare(turn))
    release = threading.Event()
    blocker = state.chat._retrieval_thread.submit(release.wait)  # the retrieval thread is busy
    served_before = requests_served(state)
    try:
        clients = [send_and_keep(server, story(state, knowledge_base="docs")) for _ in range(3)]
        time.sleep(0.5)  # the requests are parsed and waiting for the retrieval thread
        for connection in clients:
            connection.close()
        time.sleep(0.5)
    finally:
        release.set()
        blocker.result(timeout=5)
    time.sleep(0.5)
    assert prepared == []  # no retrieval ran for a client that had left
    assert requests_served(state) == served_before
    assert_freed(server, state, idle_seconds)


@pytest.mark.parametrize("stream", [False, True])
def test_client_gone_during_prefill(server, state, idle_seconds, stream):
    long_question = [{"role": "user", "content": "Summarise this. " + "The lighthouse stands on a rock. " * 250}]
    served_before = requests_served(state)
    connection = send_and_keep(server, story(state, messages=long_question, stream=stream))
    assert wait_for(lambda: state.generator.stats().running == 1)  # admitted: its prefill runs now
    connection.close()
    assert_freed(server, state, idle_seconds)
    assert requests_served(state) == served_before + 2  # the vanished one and the check


def test_non_streamed_client_gone_while_decoding(server, state, idle_seconds):
    connection = send_and_keep(server, story(state))
    assert wait_for(lambda: state.generator.stats().running == 1)
    time.sleep(0.5)  # decoding, nothing sent yet: a non-streamed answer comes whole
    connection.close()
    assert_freed(server, state, idle_seconds)
