"""Knowledge bases end to end on the real embedder, on both backends: FAISS + BM25 + SQLite
(local) and embedded Milvus (milvus-lite); tests of one backend's internals use ``local_kbs``."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

from memory.chunk_store import ChunkRecord
from memory.ingestion import add_paths, check_compatible, rebuild, remove_paths
from memory.knowledge_base import (
    EmbedderMismatch,
    KnowledgeBaseBusy,
    KnowledgeBaseError,
    KnowledgeBaseNotFound,
    KnowledgeBases,
    join_without_overlap,
    validate_name,
)
from memory.milvus_backend import collection_prefix, name_hash
from rag.retrieval import Retriever

def dense_search(kb, embedder, query: str, top_k: int, step: int = 0):
    """The raw vector hits of one opened knowledge base (``ingest search --dense-only``)."""
    return Retriever(None, embedder).dense_hits(kb, query, top_k=top_k, step=step)


REFUND = "退款政策\n\n购买后七天内可以申请无理由退款。退款会在三个工作日内原路退回到您的支付账户。如需退款，请在订单页面点击申请退款按钮。"
WEATHER = "北京天气\n\n今天北京晴，最高气温二十五摄氏度，傍晚有微风。明天转多云，夜间可能有小雨，请注意携带雨具。"
GPU = "显卡驱动\n\n使用 nvidia-smi 可以查看显卡的显存占用和温度。性能状态 P0 表示最大性能，P12 表示最小性能。"


class CountingEmbedder:
    """The real embedder, counting how many texts it was asked to embed."""

    def __init__(self, inner):
        self.inner = inner
        self.model_id = inner.model_id
        self.dimension = inner.dimension
        self.embedded: list[str] = []

    def embed_passages(self, texts, progress=None):
        self.embedded += list(texts)
        return self.inner.embed_passages(texts, progress=progress)

    def embed_queries(self, texts):
        return self.inner.embed_queries(texts)


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "refund.txt").write_text(REFUND, encoding="utf-8")
    (folder / "weather.md").write_text(WEATHER, encoding="utf-8")
    (folder / "gpu.txt").write_text(GPU, encoding="gb18030")
    return folder


@pytest.fixture(params=["local", "milvus"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def kbs(settings, backend):
    catalogue = KnowledgeBases.from_settings(settings.model_copy(update={"vector_store": backend}))
    yield catalogue
    catalogue.close()


@pytest.fixture
def local_kbs(settings):
    return KnowledgeBases.from_settings(settings)


def texts_of(kb) -> list[str]:
    return [c.text for c in kb.all_chunks()]


def ingest(kbs, paths, embedder, name="default", **kwargs):
    return add_paths(kbs, name, paths, embedder, chunk_size=120, chunk_overlap=20, **kwargs)


def test_add_then_search_finds_the_right_document(kbs, docs, embedder):
    report = ingest(kbs, [docs], embedder)
    assert report.count("ingested") == 3 and report.exit_code == 0
    kb = kbs.open("default")
    try:
        results = dense_search(kb, embedder, "怎么申请退款？", top_k=2)
        assert results[0].source.endswith("refund.txt")
        assert 0 < results[0].score <= 1.0
        assert results[0].score > results[1].score
        assert kb.check_consistency() == []
    finally:
        kb.close()


def test_reingest_unchanged_embeds_nothing_and_changed_file_is_replaced(kbs, docs, embedder):
    counting = CountingEmbedder(embedder)
    ingest(kbs, [docs], counting)
    first = len(counting.embedded)
    assert first > 0

    report = ingest(kbs, [docs], counting)
    assert report.count("unchanged") == 3 and len(counting.embedded) == first

    kb = kbs.open("default")
    old_ids = {c.id for c in kb.all_chunks()}
    kb.close()
    (docs / "weather.md").write_text(WEATHER.replace("二十五", "三十"), encoding="utf-8")
    report = ingest(kbs, [docs], counting)
    assert report.count("ingested") == 1 and report.count("unchanged") == 2
    kb = kbs.open("default")
    try:
        assert kb.check_consistency() == []
        texts = texts_of(kb)
        assert any("三十" in t for t in texts) and not any("二十五" in t for t in texts)
        assert {c.id for c in kb.all_chunks()} != old_ids
    finally:
        kb.close()


def test_identical_text_in_two_files_is_embedded_once(kbs, docs, embedder):
    counting = CountingEmbedder(embedder)
    shutil.copy(docs / "refund.txt", docs / "refund-copy.txt")
    ingest(kbs, [docs], counting)
    assert len(counting.embedded) == len(set(counting.embedded))
    kb = kbs.open("default")
    try:
        assert {d.path.rsplit("/", 1)[1]: d.chunk_count for d in kb.documents()}["refund-copy.txt"] > 0
    finally:
        kb.close()


def test_prune_and_remove(kbs, docs, embedder):
    ingest(kbs, [docs], embedder)
    (docs / "gpu.txt").unlink()
    report = ingest(kbs, [docs], embedder, prune=True)
    assert [o.path.rsplit("/", 1)[1] for o in report.outcomes if o.outcome == "removed"] == ["gpu.txt"]
    removed = remove_paths(kbs, "default", [docs / "weather.md"])
    assert len(removed) == 1
    kb = kbs.open("default")
    try:
        assert [d.path.rsplit("/", 1)[1] for d in kb.documents()] == ["refund.txt"]
        assert kb.check_consistency() == []
    finally:
        kb.close()


def test_broken_file_fails_alone_and_unsupported_is_skipped(kbs, docs, embedder):
    (docs / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (docs / "slides.key").write_bytes(b"PK\x03\x04 not really")
    report = ingest(kbs, [docs], embedder)
    assert report.count("ingested") == 3
    assert [o.path.rsplit("/", 1)[1] for o in report.failed] == ["binary.txt"]
    assert "binary" in report.failed[0].error
    assert report.count("skipped") == 1 and report.exit_code == 1
    kb = kbs.open("default")
    try:
        statuses = {d.path.rsplit("/", 1)[1]: d.status for d in kb.documents()}
        assert statuses == {
            "binary.txt": "failed",
            "slides.key": "skipped",
            "refund.txt": "ok",
            "weather.md": "ok",
            "gpu.txt": "ok",
        }
    finally:
        kb.close()


def test_names_are_validated_and_chinese_names_work(kbs, docs, embedder):
    # a..b: the docs promise no ".."; ｋｂ and the Ångström sign: NFKC look-alikes of kb and Å
    for bad in ["../etc", "a/b", ".hidden", "", "x" * 65, "a b", "a..b", "ｋｂ", "\u212b"]:
        with pytest.raises(KnowledgeBaseError):
            validate_name(bad)
    ingest(kbs, [docs], embedder, name="产品手册")
    assert kbs.names() == ["产品手册"]
    with pytest.raises(KnowledgeBaseNotFound):
        kbs.open("nope")


def test_different_embedder_or_chunking_is_refused(kbs, docs, embedder):
    ingest(kbs, [docs], embedder)
    manifest = kbs.manifest("default")
    with pytest.raises(EmbedderMismatch, match="ingest rebuild"):
        check_compatible(manifest, "moka-ai/m3e-base", None, None)
    with pytest.raises(KnowledgeBaseError, match="chunk_size"):
        add_paths(kbs, "default", [docs], embedder, chunk_size=300, chunk_overlap=20)


def test_second_writer_fails_fast(kbs, docs, embedder):
    ingest(kbs, [docs], embedder)
    held, release = threading.Event(), threading.Event()

    def hold():
        with kbs.lock("default"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    try:
        with pytest.raises(KnowledgeBaseBusy, match="another process"):
            ingest(kbs, [docs], embedder)
    finally:
        release.set()
        thread.join()


def test_stale_or_missing_index_is_reconciled_on_open(local_kbs, docs, embedder):
    ingest(local_kbs, [docs / "refund.txt"], embedder)
    kb = local_kbs.open("default")
    old_index = next(kb.store_dir.glob("vectors.*.faiss"))
    saved = old_index.read_bytes()
    kb.close()
    ingest(local_kbs, [docs], embedder)
    kb = local_kbs.open("default")
    store_dir = kb.store_dir
    kb.close()
    # Simulate a kill after the store committed but before the index was saved.
    for path in store_dir.glob("vectors.*.faiss"):
        path.unlink()
    old_index.write_bytes(saved)
    kb = local_kbs.open("default")
    try:
        assert kb.check_consistency() == []
        assert len(kb.index) == kb.store.chunk_count()
        assert dense_search(kb, embedder, "显卡性能状态", top_k=1)[0].source.endswith("gpu.txt")
    finally:
        kb.close()


def test_an_unchanged_reingest_never_loads_the_index_and_a_change_keeps_it_exact(local_kbs, docs, embedder, monkeypatch):
    from memory.vector_index import VectorIndex

    ingest(local_kbs, [docs], embedder)
    loaded: list[str] = []
    original = VectorIndex.load.__func__
    monkeypatch.setattr(VectorIndex, "load", classmethod(lambda cls, path: loaded.append(path) or original(cls, path)))
    report = ingest(local_kbs, [docs], embedder)
    assert report.count("unchanged") == 3 and loaded == []
    (docs / "weather.md").write_text(WEATHER.replace("二十五", "三十"), encoding="utf-8")
    report = ingest(local_kbs, [docs], embedder)
    assert report.count("ingested") == 1 and loaded  # the index was loaded before the write
    kb = local_kbs.open("default")
    try:
        assert kb.check_consistency() == []
        assert len(kb.index) == kb.store.chunk_count()
    finally:
        kb.close()


def test_rebuild_switches_embedder_atomically(kbs, backend, docs, embedder, settings, tmp_path):
    from memory.embedding import load_embedder, resolve_embedding_model

    ingest(kbs, [docs], embedder)
    copy = tmp_path / "e5-copy"
    shutil.copytree(resolve_embedding_model(embedder.model_id, settings), copy)
    other = load_embedder(settings, str(copy))
    before = kbs.manifest("default")
    after = rebuild(kbs, "default", other)
    assert after.embedding_model == str(copy) and after.store != before.store
    if backend == "local":
        assert not (kbs.root / "default" / before.store).exists()
        assert list((kbs.root / "default" / after.store).glob("vectors.*.faiss"))  # saved before the switch
    else:
        prefix = f"zhiku_{name_hash('default')}_"
        left = sorted(c for c in kbs.milvus.call("list_collections") if c.startswith(prefix))
        assert left == [f"{collection_prefix(after)}_chunks", f"{collection_prefix(after)}_documents"]  # old store dropped
    kb = kbs.open("default")
    try:
        assert kb.check_consistency() == []
        assert dense_search(kb, other, "怎么申请退款？", top_k=1)[0].source.endswith("refund.txt")
    finally:
        kb.close()


def test_neighbour_expansion_joins_without_overlap(kbs, tmp_path, embedder):
    text = "".join(f"第{i}句话讲的是编号为{i}的主题内容。" for i in range(40))
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    add_paths(kbs, "long", [tmp_path / "long.txt"], embedder, chunk_size=60, chunk_overlap=15)
    kb = kbs.open("long")
    try:
        hit = dense_search(kb, embedder, "第20句话讲的是编号为20的主题内容", top_k=1)[0]
        widened = kb.expand(kb.chunks([hit.chunk_ids[0]])[hit.chunk_ids[0]], step=1, char_budget=10_000)
        assert len(widened) > len(hit.text)
        assert widened in text  # overlap removed exactly: the joined text is a real span of the document
        assert len(kb.expand(kb.chunks([hit.chunk_ids[0]])[hit.chunk_ids[0]], step=3, char_budget=70)) <= 70
    finally:
        kb.close()


def test_join_without_overlap_handles_gaps():
    a = ChunkRecord(1, 1, "d", 0, "abcdef", (), 0, 6)
    b = ChunkRecord(2, 1, "d", 1, "efgh", (), 4, 8)
    c = ChunkRecord(3, 1, "d", 2, "xyz", (), 10, 13)
    assert join_without_overlap([a, b]) == "abcdefgh"
    assert join_without_overlap([a, b, c]) == "abcdefgh\nxyz"


def test_scores_are_cosine_similarities(kbs, docs, embedder):
    ingest(kbs, [docs], embedder)
    kb = kbs.open("default")
    try:
        query = embedder.embed_queries(["北京明天的天气"])[0]
        hit = kb.search(query, 1)[0]
        stored = kb.chunk_vectors([hit.chunk.id])[0]
        assert hit.score == pytest.approx(float(stored @ query), abs=1e-5)
    finally:
        kb.close()


def test_readers_are_not_blocked_by_a_writer_mid_transaction(local_kbs, docs, embedder):
    ingest(local_kbs, [docs], embedder)
    with local_kbs.writer("default") as writer:
        writer.store.conn.execute("BEGIN IMMEDIATE")
        writer.store.conn.execute("DELETE FROM chunks")  # uncommitted: readers must not see it
        reader = local_kbs.open("default")
        try:
            assert reader.store.chunk_count() > 0
            assert dense_search(reader, embedder, "怎么申请退款？", top_k=1)[0].source.endswith("refund.txt")
        finally:
            reader.close()
            writer.store.conn.execute("ROLLBACK")


def test_pipelined_batches_embed_each_text_once(kbs, tmp_path, embedder):
    folder = tmp_path / "many"
    folder.mkdir()
    for n in range(8):
        body = REFUND if n % 2 else f"第{n}号文件。" + WEATHER  # every other file repeats REFUND
        (folder / f"f{n}.txt").write_text(body, encoding="utf-8")
    counting = CountingEmbedder(embedder)
    report = ingest(kbs, [folder], counting, batch_chunks=2)  # many small batches in flight
    assert report.count("ingested") == 8
    assert len(counting.embedded) == len(set(counting.embedded))
    kb = kbs.open("default")
    try:
        assert kb.check_consistency() == []
        assert all(d.chunk_count > 0 for d in kb.documents())
        hits = dense_search(kb, embedder, "怎么申请退款？", top_k=4)
        assert {h.source.rsplit("/", 1)[1] for h in hits} <= {"f1.txt", "f3.txt", "f5.txt", "f7.txt"}
    finally:
        kb.close()


def test_parsing_in_a_separate_process_stores_what_parsing_in_process_does(local_kbs, docs, embedder, monkeypatch):
    import memory.ingestion

    (docs / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (docs / "slides.pptx").write_bytes(b"PK\x03\x04 not really")
    in_process = ingest(local_kbs, [docs], embedder, name="inline")
    monkeypatch.setattr(memory.ingestion, "PARALLEL_PARSE_MIN_FILES", 1)
    monkeypatch.setattr(memory.ingestion, "PARSE_GROUP_FILES", 2)  # several requests in flight
    monkeypatch.setattr(memory.ingestion, "READ_AHEAD_FILES", 2)
    parallel = ingest(local_kbs, [docs], embedder, name="worker")
    assert [(o.path, o.outcome, o.chunks, o.error) for o in parallel.outcomes] == [
        (o.path, o.outcome, o.chunks, o.error) for o in in_process.outcomes
    ]

    def rows(name):
        kb = local_kbs.open(name)
        try:
            return kb.store.conn.execute(
                "SELECT d.path, c.ordinal, c.text, c.text_sha, c.pages, c.start_offset, c.end_offset, c.tokens, c.vector"
                " FROM chunks c JOIN documents d ON d.id = c.document_id ORDER BY d.path, c.ordinal"
            ).fetchall()
        finally:
            kb.close()

    assert rows("worker") == rows("inline") and rows("worker")


def test_a_dead_parsing_process_is_an_error_not_a_hang(tmp_path):
    import os
    import signal

    from ingest.worker import ParseWorker, WorkerDied

    worker = ParseWorker()
    try:
        ticket = worker.submit(os.getpid)
        child = worker.result(ticket)
        assert child == worker.process.pid
        os.kill(child, signal.SIGKILL)
        with pytest.raises(WorkerDied):
            worker.result(worker.submit(os.getpid))
    finally:
        worker.close()


# ---------------------------------------------------------------- the one service


def test_the_service_keeps_a_knowledge_base_s_own_chunking_and_refuses_others(settings, docs, embedder):
    from memory.service import KnowledgeBaseExists, KnowledgeBaseService

    service = KnowledgeBaseService(KnowledgeBases.from_settings(settings), settings.model_copy(update={"chunk_size": 150, "chunk_overlap": 30}))
    service.add("手册", [docs], embedder)
    assert service.chunking_for("手册") == (150, 30)
    later = KnowledgeBaseService(service.knowledge_bases, settings)  # configured differently now
    assert later.chunking_for("手册") == (150, 30) and later.chunking_for("新的") == (settings.chunk_size, settings.chunk_overlap)
    with pytest.raises(KnowledgeBaseError, match="chunk_size=150, not 400"):
        later.add("手册", [docs], embedder, chunk_size=400)
    with pytest.raises(KnowledgeBaseError, match="not 'other/model'"):
        later.embedder_for("手册", "other/model")
    summary = later.summary("手册")
    assert summary["name"] == "手册" and summary["documents"] == 3 and summary["chunks"] >= 3
    assert summary["embedding_model"] == embedder.model_id
    with pytest.raises(KnowledgeBaseExists):
        later.create("手册", embedder)
    later.drop("手册")
    assert later.names() == []
