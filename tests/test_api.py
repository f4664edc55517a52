"""The OpenAI-compatible server, end to end: a real uvicorn server on a free port,
the real bundled generator and embedder, real knowledge bases, and the real
``openai`` client (and LangChain's ChatOpenAI) as the test clients."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from api.app import create_app
from api.state import ServerState
from rag.chat import ChatService
from settings import Settings
from tests.live_server import LiveServer, serving_state

ZH_DOC = (
    "退款政策\n\n购买后七天内可以申请无理由退款。退款会在三个工作日内原路退回到您的支付账户。"
    "如需退款，请在订单页面点击申请退款按钮。\n\n"
    "显卡驱动\n\n使用 nvidia-smi 可以查看显卡的显存占用和温度。性能状态 P0 表示最大性能，P12 表示最小性能。"
)
EN_DOC = (
    "Serving zhiku\n\nStart the server with rag serve. It listens on port 8000 by default and "
    "answers the OpenAI chat completions API. The lighthouse keeper's cat is named Mochi.\n\n"
    "Knowledge bases are folders of documents embedded with multilingual-e5-small."
)
QUESTION = "What is the name of the lighthouse keeper's cat?"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("api-home")


@pytest.fixture(scope="module")
def server_settings(home, models_dir, adapter_dirs) -> Settings:
    return Settings(home=home, models_dir=models_dir, generator_max_batch_size=4, max_tokens_limit=2048, generator_adapters=adapter_dirs)


@pytest.fixture(scope="module")
def state(server_settings, embedder, tmp_path_factory):
    docs = tmp_path_factory.mktemp("api-docs")
    (docs / "zh").mkdir()
    (docs / "en").mkdir()
    (docs / "zh" / "shop.txt").write_text(ZH_DOC, encoding="utf-8")
    (docs / "en" / "serving.md").write_text(EN_DOC, encoding="utf-8")
    with serving_state(server_settings, embedder, {"zh-docs": docs / "zh", "en-docs": docs / "en"}, default_kb="en-docs") as state:
        yield state


@pytest.fixture(scope="module")
def server(state):
    with LiveServer.serving(state) as live:
        yield live


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def model(state) -> str:
    return state.generator.model_id


def ask(client, model, content=QUESTION, **kwargs):
    options = {"temperature": 0, "seed": 7, "max_tokens": 24, **kwargs}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **options)


# ---- models ------------------------------------------------------------------
def test_models_lists_base_and_knowledge_base_variants(client, model):
    ids = {m.id: m for m in client.models.list().data}
    assert model in ids
    assert {f"{model}@en-docs", f"{model}@zh-docs"} <= set(ids)
    assert ids[f"{model}@en-docs"].model_dump()["parent"] == model
    for adapter in ("lora", "ptuning"):
        assert ids[adapter].model_dump()["parent"] == model
        assert ids[f"{adapter}@zh-docs"].model_dump()["knowledge_base"] == "zh-docs"


def test_adapter_chosen_by_model_id_and_base_stays_reachable(client, model):
    base = ask(client, model, extra_body={"knowledge_base": None}).choices[0].message.content
    lora = ask(client, "lora", extra_body={"knowledge_base": None}).choices[0].message.content
    prefix = ask(client, "ptuning@en-docs")
    assert lora != base
    assert prefix.model_dump()["sources"] and prefix.model == "ptuning@en-docs"
    assert ask(client, model, extra_body={"knowledge_base": None}).choices[0].message.content == base


# ---- non-stream ----------------------------------------------------------------
def test_chat_answers_with_sources_and_exact_usage(client, model, state):
    reply = ask(client, model, extra_body={"knowledge_base": "en-docs"})
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == model
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    sources = reply.model_dump()["sources"]
    assert sources and sources[0]["index"] == 1 and sources[0]["source"].endswith("serving.md")
    assert -1.0 <= sources[0]["score"] <= 1.0
    usage = reply.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens <= 24


def test_prompt_tokens_include_the_retrieved_context(client, model, state):
    with_context = ask(client, model, extra_body={"knowledge_base": "en-docs"}).usage.prompt_tokens
    without = ask(client, model, extra_body={"knowledge_base": None}).usage.prompt_tokens
    bare = state.generator.count_prompt_tokens([{"role": "user", "content": QUESTION}])
    assert without == bare
    assert with_context > without + state.generator.count_text_tokens("The lighthouse keeper's cat is named Mochi.")


def test_max_tokens_gives_length(client, model):
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a long story about a dragon."}], temperature=0, max_completion_tokens=3
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_stop_sequence_cuts_the_answer(client, model):
    full = ask(client, model, extra_body={"knowledge_base": None}).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = ask(client, model, stop=[stop], extra_body={"knowledge_base": None}).choices[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.message.content
    assert full.startswith(cut.message.content)


def test_n_choices_with_a_seed_are_reproducible(client, model):
    def sample():
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say something about the sea."}], n=2, temperature=1.0, seed=11, max_tokens=12
        )

    first, second = sample(), sample()
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]


# ---- knowledge-base selection ------------------------------------------------------
def test_knowledge_base_by_field_and_by_model_id(client, model):
    by_field = ask(client, model, content="如何申请退款？", extra_body={"knowledge_base": "zh-docs"}).model_dump()["sources"]
    by_model = ask(client, f"{model}@zh-docs", content="如何申请退款？").model_dump()["sources"]
    default = ask(client, model, content="如何申请退款？").model_dump()["sources"]
    assert by_field and by_field[0]["source"].endswith("shop.txt")
    assert [s["source"] for s in by_model] == [s["source"] for s in by_field]
    assert default and all(s["source"].endswith("serving.md") for s in default)  # the server's --kb


def test_nothing_above_threshold_sends_no_context_and_says_so(client, model):
    reply = ask(client, model, extra_body={"knowledge_base": "en-docs", "score_threshold": 0.999})
    assert reply.model_dump()["sources"] == []
    assert reply.choices[0].message.content.startswith("(No relevant passage was found")


# ---- streaming -------------------------------------------------------------------
def test_stream_equals_non_stream_and_is_well_formed(client, model):
    kwargs = dict(extra_body={"knowledge_base": "en-docs"})
    expected = ask(client, model, **kwargs)
    chunks = list(ask(client, model, stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_dump()["sources"] == expected.model_dump()["sources"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.choices[0].finish_reason]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == expected.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_stream_without_include_usage_has_no_usage_chunk(client, model):
    chunks = list(ask(client, model, stream=True, extra_body={"knowledge_base": None}))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_client_disconnect_frees_the_generator(server, model, state):
    body = {"model": model, "messages": [{"role": "user", "content": "Tell a very long story."}], "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            next(lines)
    deadline = time.monotonic() + 10
    while (state.generator.stats().running + state.generator.stats().queue_depth) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (state.generator.stats().running + state.generator.stats().queue_depth) == 0
    # the generator is free: a short request finishes promptly
    started = time.monotonic()
    ask(openai.OpenAI(base_url=f"{server.url}/v1", api_key="x"), model, max_tokens=2, extra_body={"knowledge_base": None})
    assert time.monotonic() - started < 10


# ---- errors ------------------------------------------------------------------------
def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    return body["error"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, "no-such-model")
    assert error_of(caught.value)["code"] == "model_not_found"


def test_unknown_knowledge_base_is_404(client, model):
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, model, extra_body={"knowledge_base": "nope"})
    assert error_of(caught.value)["param"] == "knowledge_base"
    with pytest.raises(openai.NotFoundError):
        ask(client, f"{model}@nope")


def test_bad_role_is_400_naming_the_field(client, model):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "hi"}])
    error = error_of(caught.value)
    assert error["type"] == "invalid_request_error" and error["param"].startswith("messages.0")


def test_negative_max_tokens_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    assert error_of(caught.value)["param"] == "max_tokens"


def test_over_long_context_is_400_with_the_limit(client, model, state):
    window = state.generator.context_window
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "word " * (window + 10)}], max_tokens=16, extra_body={"knowledge_base": None}
        )
    error = error_of(caught.value)
    assert error["code"] == "context_length_exceeded" and str(window) in error["message"]


def test_malformed_json_and_oversized_body(server):
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    huge = b'{"model": "x", "messages": [], "pad": "' + b"a" * 1_100_000 + b'"}'
    response = httpx.post(f"{server.url}/v1/chat/completions", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_last_message_must_be_the_user(client, model):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "assistant", "content": "hi"}])


# ---- other endpoints -----------------------------------------------------------------
def test_embeddings_match_the_embedder(client, state):
    reply = client.embeddings.create(model=state.embedder.model_id, input=["退款政策", "refund"])
    assert [d.index for d in reply.data] == [0, 1]
    expected = state.embedder.embed_queries(["退款政策", "refund"])
    assert abs(sum(a * b for a, b in zip(reply.data[0].embedding, expected[0])) - 1.0) < 1e-4


def test_health_and_ready(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json()["status"] == "ready"


def test_knowledge_base_lifecycle_over_http(server, tmp_path):
    api = f"{server.url}/v1/knowledge_bases"
    assert httpx.post(api, json={"name": "上传"}).status_code == 201
    assert httpx.post(api, json={"name": "../evil"}).status_code == 400
    files = [
        ("files", ("../../notes.txt", "售后电话是 400-123-4567，工作日九点到十八点接听。".encode("gb18030"), "text/plain")),
        ("files", ("broken.pdf", b"%PDF-1.4 not really", "application/pdf")),
    ]
    report = httpx.post(f"{api}/上传/documents", params={"wait": "true"}, files=files, timeout=120).json()
    outcomes = {o["path"].rsplit("/", 1)[-1]: o for o in report["data"]}
    assert outcomes["notes.txt"]["outcome"] == "ingested" and outcomes["broken.pdf"]["outcome"] == "failed"
    assert report["failed"] == 1
    documents = httpx.get(f"{api}/上传/documents").json()["data"]
    notes = next(d for d in documents if d["path"].endswith("notes.txt"))
    hits = httpx.post(f"{api}/上传/search", json={"query": "售后电话", "top_k": 3}).json()["data"]
    assert hits and "400-123-4567" in hits[0]["text"]
    assert httpx.delete(f"{api}/上传/documents/{notes['id']}").json()["deleted"]
    assert httpx.delete(f"{api}/上传").json()["deleted"]
    assert httpx.get(f"{api}/上传/documents").status_code == 404


def test_langchain_chat_openai(server, model):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=model, temperature=0, max_tokens=16, seed=7)
    answer = llm.invoke(QUESTION)
    streamed = "".join(part.content for part in llm.stream(QUESTION))
    assert answer.content and streamed == answer.content


# ---- auth ------------------------------------------------------------------------------
def test_auth_when_keys_are_set(state):
    settings = state.settings.model_copy(update={"api_keys": ["user-key"], "admin_api_keys": ["admin-key"]})
    locked = ServerState(**{**state.__dict__, "settings": settings})
    with LiveServer(create_app(settings, state=locked)) as live:
        base = f"{live.url}/v1"
        assert httpx.get(f"{live.url}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{base}/models").status_code == 401
        assert openai.OpenAI(base_url=base, api_key="user-key").models.list().data
        user = {"Authorization": "Bearer user-key"}
        assert httpx.post(f"{base}/knowledge_bases", json={"name": "x"}, headers=user).status_code == 403
        admin = {"Authorization": "Bearer admin-key"}
        assert httpx.post(f"{base}/knowledge_bases", json={"name": "x"}, headers=admin).status_code == 201
        again = httpx.post(f"{base}/knowledge_bases", json={"name": "x"}, headers=admin)
        assert again.status_code == 409 and again.json()["error"]["code"] == "knowledge_base_exists"
        assert again.json()["error"]["param"] == "name"
        assert httpx.delete(f"{base}/knowledge_bases/x", headers=admin).status_code == 200


# ---- upstream backend --------------------------------------------------------------------
def test_upstream_backend_against_a_second_server(server, state, model):
    from rag.upstream_generator import UpstreamGenerator

    settings = state.settings.model_copy(update={"upstream_base_url": f"{server.url}/v1"})
    upstream = UpstreamGenerator.from_settings(settings)
    assert upstream.model_id == model
    proxy = ServerState(**{**state.__dict__, "settings": settings, "generator": upstream, "chat": ChatService(upstream, state.retriever, settings)})
    with LiveServer(create_app(settings, state=proxy)) as live:
        via_proxy = ask(openai.OpenAI(base_url=f"{live.url}/v1", api_key="x"), model, extra_body={"knowledge_base": "en-docs"})
    direct = ask(openai.OpenAI(base_url=f"{server.url}/v1", api_key="x"), model, extra_body={"knowledge_base": "en-docs"})
    assert via_proxy.choices[0].message.content == direct.choices[0].message.content
    assert via_proxy.model_dump()["sources"] == direct.model_dump()["sources"]
    assert via_proxy.usage.prompt_tokens == direct.usage.prompt_tokens


# ---- overload ------------------------------------------------------------------------------
def test_full_queue_is_429_with_retry_after(state, generator_model_path):
    from rag.local_generator import LocalGenerator

    narrow = LocalGenerator(generator_model_path, dtype="float32", model_id=state.generator.model_id, max_batch_size=1, queue_size=1)
    busy = ServerState(**{**state.__dict__, "generator": narrow, "chat": ChatService(narrow, state.retriever, state.settings)})
    story = {"model": narrow.model_id, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 120, "knowledge_base": None}

    async def scenario(url: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as http:
            async def occupy():
                async with http.stream("POST", url, json={**story, "stream": True}) as response:
                    async for _ in response.aiter_lines():
                        pass

            running = asyncio.create_task(occupy())  # takes the only batch slot
            while narrow.stats().running < 1:
                await asyncio.sleep(0.02)
            waiting = asyncio.create_task(http.post(url, json=story))  # takes the only queue place
            while narrow.stats().queue_depth < 1:
                await asyncio.sleep(0.02)
            refused = await http.post(url, json=story)
            for task in (running, waiting):
                task.cancel()
            await asyncio.gather(running, waiting, return_exceptions=True)
            return refused

    try:
        with LiveServer(create_app(state.settings, state=busy)) as live:
            refused = asyncio.run(asyncio.wait_for(scenario(f"{live.url}/v1/chat/completions"), 60))
    finally:
        asyncio.run(narrow.aclose())
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"


def test_a_dropped_and_recreated_knowledge_base_is_searched_afresh(server):
    api = f"{server.url}/v1/knowledge_bases"
    for text in ("第一版：保修期为一年。", "第二版：保修期为三年。"):
        assert httpx.post(api, json={"name": "重建"}).status_code == 201
        files = [("files", ("warranty.txt", text.encode("utf-8"), "text/plain"))]
        assert httpx.post(f"{api}/重建/documents", params={"wait": "true"}, files=files, timeout=120).json()["failed"] == 0
        hits = httpx.post(f"{api}/重建/search", json={"query": "保修期多久", "top_k": 1}).json()["data"]
        assert hits[0]["text"] == text
        assert httpx.delete(f"{api}/重建").status_code == 200


def test_knowledge_base_from_another_embedder_is_a_clear_400(client, model, state):
    from memory.knowledge_base import Manifest

    manifest = Manifest("其他模型", "moka-ai/m3e-base", 768, 600, 120, "store-1")
    with state.knowledge_bases.writer("其他模型", create=manifest):
        pass
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, model, extra_body={"knowledge_base": "其他模型"})
    error = error_of(caught.value)
    assert error["code"] == "embedding_model_mismatch" and "ingest rebuild" in error["message"]
    state.knowledge_bases.drop("其他模型")


def test_ready_reports_a_failed_load(server_settings, tmp_path):
    broken = server_settings.model_copy(update={"generator_model": str(tmp_path / "no-such-model"), "home": tmp_path})
    with LiveServer(create_app(broken)) as live:
        deadline = time.monotonic() + 60
        while (body := httpx.get(f"{live.url}/ready").json())["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert body["status"] == "failed" and "no-such-model" in body["error"]
        assert httpx.get(f"{live.url}/health").status_code == 200
        response = httpx.get(f"{live.url}/v1/models")
        assert response.status_code == 503 and "no-such-model" in response.json()["error"]["message"]


def test_stream_with_two_choices_finishes_each_once(client, model):
    chunks = list(ask(client, model, n=2, stream=True, extra_body={"knowledge_base": None}))
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(index for index, _ in finishes) == [0, 1]
    firsts = [c.choices[0] for c in chunks[:2]]
    assert [f.index for f in firsts] == [0, 1] and all(f.delta.role == "assistant" for f in firsts)
