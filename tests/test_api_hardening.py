"""What an outside audit found the server doing wrong, each as a test on a real server:
upload names that lost files or gave 500s, uploads written where a refused or killed
request left orphans, over-limit chunked bodies read in full, lone surrogates and
non-boolean booleans, an undiscoverable embedding model, CORS open to every site,
keys that saw every knowledge base, absolute server paths in responses."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from api.app import create_app
from api.state import ServerState
from api.uploads import clean_leftovers
from memory.ingestion import add_paths
from settings import KeyScope, Settings
from tests.live_server import LiveServer, serving_state

UPLOAD_LIMIT = 200_000


@pytest.fixture(scope="module")
def state(tmp_path_factory, models_dir, embedder):
    docs = tmp_path_factory.mktemp("hardening-docs")
    (docs / "zh").mkdir()
    (docs / "en").mkdir()
    (docs / "zh" / "shop.txt").write_text("退款政策：购买后七天内可以申请无理由退款。", encoding="utf-8")
    (docs / "en" / "serving.md").write_text("The lighthouse keeper's cat is named Mochi.", encoding="utf-8")
    other = tmp_path_factory.mktemp("hardening-other")
    (other / "secret.txt").write_text("The vault code of the other team is 4711.", encoding="utf-8")
    settings = Settings(
        home=tmp_path_factory.mktemp("hardening-home"),
        models_dir=models_dir,
        generator_max_batch_size=2,
        max_tokens_limit=64,
        default_max_tokens=8,
        max_upload_bytes=UPLOAD_LIMIT,
    )
    with serving_state(settings, embedder, {"手册": docs, "other": other}, default_kb="手册") as state:
        yield state


@pytest.fixture(scope="module")
def server(state):
    with LiveServer.serving(state) as live:
        yield live


@pytest.fixture(scope="module")
def api(server) -> str:
    return f"{server.url}/v1"


def chat(api: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{api}/chat/completions", json=body, headers=headers, timeout=120)


def upload(api: str, kb: str, files: list[tuple[str, bytes]], **kwargs) -> httpx.Response:
    """The synchronous upload (``?wait=true``): the answer is the per-file report."""
    return httpx.post(
        f"{api}/knowledge_bases/{kb}/documents", params={"wait": "true"}, files=[("files", (n, c, "text/plain")) for n, c in files], timeout=120, **kwargs
    )


# ---- §2 uploads -----------------------------------------------------------------------------
def test_long_and_clashing_names_are_all_kept_with_their_extensions(api, state):
    files = [
        ("中" * 96 + ".txt", "第一份：很长的中文文件名。".encode()),
        ("a?.txt", "第二份：问号。".encode()),
        ("a*.txt", "第三份：星号。".encode()),
        ("x" * 296 + ".md", b"# Fourth\n\nA very long Latin name."),
    ]
    response = upload(api, "names", files)
    assert response.status_code == 200, response.text
    outcomes = response.json()["data"]
    assert [o["outcome"] for o in outcomes] == ["ingested"] * 4
    stored = [o["path"] for o in outcomes]
    assert len(set(stored)) == 4
    assert all(len(name.encode()) <= 200 and "/" not in name for name in stored)
    assert sorted(name.rsplit(".", 1)[1] for name in stored) == ["md", "txt", "txt", "txt"]
    folder = state.settings.home / "uploads" / "names"
    assert sorted(p.read_bytes() for p in folder.iterdir()) == sorted(c for _, c in files)


def test_a_refused_upload_leaves_nothing_and_replaces_nothing(api, state):
    assert upload(api, "busy", [("warranty.txt", "保修期为一年。".encode())]).status_code == 200
    original = (state.settings.home / "uploads" / "busy" / "warranty.txt").read_bytes()
    with state.knowledge_bases.lock("busy"):  # another writer (a CLI ingest) holds the knowledge base
        refused = upload(api, "busy", [("warranty.txt", "保修期为三年。".encode()), ("new.txt", b"new file")])
    assert refused.status_code == 409 and refused.headers["retry-after"]
    folder = state.settings.home / "uploads" / "busy"
    assert sorted(p.name for p in folder.iterdir()) == ["warranty.txt"]
    assert (folder / "warranty.txt").read_bytes() == original
    assert not any((state.settings.home / "staging").iterdir())


def test_start_up_removes_what_a_crash_left(state, tmp_path):
    home = state.settings.home
    cut_off = home / "staging" / "request-cut-off"
    cut_off.mkdir(parents=True)
    (cut_off / "half.txt").write_bytes(b"half an upload")
    kb_uploads = home / "uploads" / "crash"
    kb_uploads.mkdir(parents=True)
    (kb_uploads / "committed.txt").write_text("已经入库的文件。", encoding="utf-8")
    add_paths(state.knowledge_bases, "crash", [kb_uploads / "committed.txt"], state.embedder, chunk_size=600, chunk_overlap=120)
    (kb_uploads / "moved-in-then-killed.txt").write_text("没有入库的文件。", encoding="utf-8")
    dropped = home / "uploads" / "dropped-kb"
    dropped.mkdir()
    (dropped / "left.txt").write_text("x", encoding="utf-8")

    clean_leftovers(home, state.knowledge_bases)

    assert not (home / "staging").exists()
    assert sorted(p.name for p in kb_uploads.iterdir()) == ["committed.txt"]
    assert not dropped.exists()
    assert [d.status for d in state.knowledge_bases.documents("crash")] == ["ok"]


def _chunked(body: bytes, piece: int = 64 * 1024):
    for start in range(0, len(body), piece):
        yield body[start : start + piece]


def test_chunked_bodies_over_the_limit_are_cut_off_with_413(api, state):
    model = state.generator.model_id
    big_chat = json.dumps({"model": model, "messages": [{"role": "user", "content": "a" * 1_200_000}]}).encode()
    response = httpx.post(f"{api}/chat/completions", content=_chunked(big_chat), headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    boundary = "zhikuboundary"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n"
    ).encode() + "大".encode() * (UPLOAD_LIMIT) + f"\r\n--{boundary}--\r\n".encode()
    response = httpx.post(
        f"{api}/knowledge_bases/chunked/documents",
        content=_chunked(part),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )
    assert response.status_code == 413
    assert not state.knowledge_bases.exists("chunked")
    assert not (state.settings.home / "uploads" / "chunked").exists()


# ---- §3 input validation ----------------------------------------------------------------------
def test_lone_surrogates_are_a_400_naming_the_field(api, state):
    model = state.generator.model_id
    raw = '{"model": "%s", "messages": [{"role": "user", "content": "\\ud800 x"}]}' % model
    response = httpx.post(f"{api}/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.content"
    raw = '{"model": "%s", "input": "\\ud800"}' % state.embedder.model_id
    response = httpx.post(f"{api}/embeddings", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"stream": "yes"}, "stream"), ({"stream": 1}, "stream"), ({"max_tokens": "5"}, "max_tokens"), ({"temperature": "0"}, "temperature")],
)
def test_booleans_and_numbers_are_strict(api, state, extra, param):
    body = {"model": state.generator.model_id, "messages": [{"role": "user", "content": "hi"}], **extra}
    response = chat(api, body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_stream_options_need_stream(api, state):
    body = {"model": state.generator.model_id, "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}
    response = chat(api, body)
    assert response.status_code == 400 and "only allowed when stream is enabled" in response.json()["error"]["message"]


def test_the_embedding_model_is_listed_and_counts_tokens(server, state):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    embedding_ids = [m.id for m in client.models.list().data if m.model_dump().get("kind") == "embedding"]
    assert embedding_ids == [state.embedder.model_id]
    text = "refund policy for international orders"
    reply = client.embeddings.create(model=embedding_ids[0], input=[text, "退款政策"])
    tokens = state.embedder.count_tokens([text, "退款政策"], queries=True)
    assert reply.usage.prompt_tokens == tokens
    assert tokens < len(text)  # tokens, not characters


# ---- §4 who may do what ----------------------------------------------------------------------
def test_cors_allows_same_machine_pages_only(api):
    def preflight(origin: str) -> httpx.Response:
        headers = {"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
        return httpx.options(f"{api}/chat/completions", headers=headers)

    assert preflight("http://localhost:3000").headers.get("access-control-allow-origin") == "http://localhost:3000"
    assert preflight("http://127.0.0.1:8080").headers.get("access-control-allow-origin") == "http://127.0.0.1:8080"
    assert "access-control-allow-origin" not in preflight("https://evil.example").headers


def test_other_origins_cannot_change_knowledge_bases_without_keys(api, server, state):
    evil = {"Origin": "https://evil.example"}
    refused = upload(api, "drive-by", [("x.txt", b"planted")], headers=evil)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "cross_origin_change"
    assert not state.knowledge_bases.exists("drive-by")
    assert httpx.delete(f"{api}/knowledge_bases/other", headers=evil).status_code == 403
    assert httpx.post(f"{api}/knowledge_bases", json={"name": "planted"}, headers=evil).status_code == 403
    assert state.knowledge_bases.exists("other")
    same_origin = upload(api, "own-page", [("x.txt", "自己的页面。".encode())], headers={"Origin": server.url})
    assert same_origin.status_code == 200


@pytest.fixture(scope="module")
def keyed(state):
    scopes = {"team-key": KeyScope(read=["手册"], write=["草稿"])}
    settings = state.settings.model_copy(update={"api_keys": ["user-key"], "admin_api_keys": ["admin-key"], "scoped_api_keys": scopes})
    with LiveServer(create_app(settings, state=ServerState(**{**state.__dict__, "settings": settings}))) as live:
        yield f"{live.url}/v1"


def test_a_scoped_key_sees_and_changes_only_its_knowledge_bases(keyed, state):
    team = {"Authorization": "Bearer team-key"}
    model = state.generator.model_id
    ids = {m["id"] for m in httpx.get(f"{keyed}/models", headers=team).json()["data"]}
    assert f"{model}@手册" in ids and f"{model}@other" not in ids
    listed = {kb["name"] for kb in httpx.get(f"{keyed}/knowledge_bases", headers=team).json()["data"]}
    assert "手册" in listed and "other" not in listed

    hidden = chat(keyed, {"model": model, "messages": [{"role": "user", "content": "vault code?"}], "knowledge_base": "other"}, headers=team)
    assert hidden.status_code == 404 and "known" not in hidden.json()["error"]["message"]
    assert chat(keyed, {"model": f"{model}@other", "messages": [{"role": "user", "content": "hi"}]}, headers=team).status_code == 404
    for response in (
        httpx.post(f"{keyed}/knowledge_bases/other/search", json={"query": "vault"}, headers=team),
        httpx.get(f"{keyed}/knowledge_bases/other/documents", headers=team),
        upload(keyed, "other", [("x.txt", b"x")], headers=team),
    ):
        assert response.status_code == 404 and "known" not in response.json()["error"]["message"]
    assert httpx.post(f"{keyed}/knowledge_bases/手册/search", json={"query": "退款"}, headers=team).status_code == 200
    read_only = upload(keyed, "手册", [("x.txt", b"x")], headers=team)
    assert read_only.status_code == 403 and read_only.json()["error"]["code"] == "write_not_allowed"
    assert upload(keyed, "草稿", [("draft.txt", "草稿：下周开会。".encode())], headers=team).status_code == 200
    assert httpx.delete(f"{keyed}/knowledge_bases/草稿", headers=team).status_code == 403  # dropping needs admin

    user = {"Authorization": "Bearer user-key"}
    unknown = httpx.get(f"{keyed}/knowledge_bases/nope/documents", headers=user)
    assert unknown.status_code == 404 and "other" not in unknown.json()["error"]["message"]
    assert upload(keyed, "other", [("x.txt", b"x")], headers=user).status_code == 403
    assert httpx.delete(f"{keyed}/knowledge_bases/草稿", headers={"Authorization": "Bearer admin-key"}).status_code == 200


def test_responses_show_paths_relative_to_what_the_user_gave(api, state):
    home = str(state.settings.home)
    documents = httpx.get(f"{api}/knowledge_bases/手册/documents").json()["data"]
    assert sorted(d["path"] for d in documents) == ["en/serving.md", "zh/shop.txt"]
    hits = httpx.post(f"{api}/knowledge_bases/手册/search", json={"query": "退款"}).json()["data"]
    assert hits[0]["source"] == "zh/shop.txt"
    body = {"model": state.generator.model_id, "messages": [{"role": "user", "content": "What is the cat called?"}], "max_tokens": 4}
    sources = chat(api, body).json()["sources"]
    assert sources and all(not s["source"].startswith("/") for s in sources)
    uploaded = upload(api, "相对", [("手册.txt", "上传的文件。".encode())]).json()["data"]
    assert uploaded[0]["path"] == "手册.txt" and home not in json.dumps(uploaded)


def test_look_alike_knowledge_base_names_are_refused(api):
    for name in ("ｋｂ", "\u212bngstrom", "a..b"):
        response = httpx.post(f"{api}/knowledge_bases", json={"name": name})
        assert response.status_code == 400, name
        assert response.json()["error"]["code"] == "invalid_knowledge_base"
