"""The BM25 lexical index: tokenisation, persistence per generation, staying in step with the store."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from memory.ingestion import add_paths, rebuild, remove_paths
from memory.knowledge_base import KnowledgeBases
from memory.lexical_index import LexicalIndex, tokenize

REFUND = "退款政策\n\n购买后七天内可以申请无理由退款。退款会在三个工作日内原路退回到您的支付账户。"
GPU = "显卡驱动\n\n使用 nvidia-smi 可以查看显卡的显存占用。运行 cli_demo.py 前设置 CUDA_VISIBLE_DEVICES=0,1。"
WEATHER = "Weather report\n\nSunny in Beijing today, light wind in the evening; HTTP/2 streams are unrelated."


def test_chinese_is_cut_into_words_and_punctuation_dropped():
    tokens = tokenize("购买后七天内可以申请无理由退款。")
    assert "退款" in tokens and "申请" in tokens
    assert "。" not in tokens and all(t.strip() for t in tokens)


def test_search_mode_also_emits_the_shorter_words_of_long_words():
    assert "中华" in tokenize("中华人民共和国") and "中华人民共和国" in tokenize("中华人民共和国")
    assert tokenize("中华人民共和国", search_mode=False) == ["中华人民共和国"]


def test_identifiers_are_kept_whole_and_split():
    tokens = tokenize("运行cli_demo.py，设置CUDA_VISIBLE_DEVICES，用 HTTP/2 和 v1.2")
    for token in ("cli_demo.py", "cli", "demo", "py", "cuda_visible_devices", "visible", "http/2", "v1.2"):
        assert token in tokens
    assert tokenize("Hello, World!") == ["hello", "world"]


def test_index_saves_and_loads(tmp_path):
    index = LexicalIndex.build(np.array([3, 8]), [tokenize("苹果 手机"), tokenize("香蕉 banana")])
    index.save(tmp_path / "lexical.1")
    loaded = LexicalIndex.load(tmp_path / "lexical.1")
    assert loaded.search(tokenize("banana"), 5) == index.search(tokenize("banana"), 5)
    assert loaded.search(tokenize("banana"), 5)[0][0] == 8
    assert loaded.search(tokenize("无关词汇"), 5) == []
    assert [p.name for p in tmp_path.iterdir()] == ["lexical.1"]  # no temporary folder left


def test_empty_index_searches_to_nothing(tmp_path):
    empty = LexicalIndex.build(np.zeros(0, np.int64), [])
    empty.save(tmp_path / "lexical.0")
    assert LexicalIndex.load(tmp_path / "lexical.0").search(["x"], 3) == []


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "refund.txt").write_text(REFUND, encoding="utf-8")
    (folder / "gpu.txt").write_text(GPU, encoding="utf-8")
    (folder / "weather.md").write_text(WEATHER, encoding="utf-8")
    return folder


def ingest(kbs, paths, embedder):
    return add_paths(kbs, "default", paths, embedder, chunk_size=120, chunk_overlap=20)


def top_source(kb, query: str) -> str:
    chunk_id = kb.lexical_search(query, 1)[0][0]
    return kb.store.chunks([chunk_id])[chunk_id].path


def lexical_dirs(kb) -> list[str]:
    return sorted(p.name for p in kb.store_dir.iterdir() if p.name.startswith(("lexical", ".lexical")))


def test_ingest_saves_the_index_under_the_store_generation(settings, docs, embedder):
    kbs = KnowledgeBases.from_settings(settings)
    ingest(kbs, [docs], embedder)
    kb = kbs.open("default")
    try:
        assert lexical_dirs(kb) == [f"lexical.{kb.store.generation()}"]
        assert top_source(kb, "cli_demo.py").endswith("gpu.txt")
        assert top_source(kb, "无理由退款").endswith("refund.txt")
        assert kb.check_consistency() == []
        # tokens are stored with the chunk, in the same row
        stored = kb.store.conn.execute("SELECT tokens FROM chunks WHERE tokens LIKE '%cli_demo.py%'").fetchall()
        assert stored
    finally:
        kb.close()


def test_add_remove_and_rebuild_keep_the_index_in_step(settings, docs, embedder, tmp_path):
    kbs = KnowledgeBases.from_settings(settings)
    ingest(kbs, [docs / "refund.txt"], embedder)
    ingest(kbs, [docs], embedder)  # add
    kb = kbs.open("default")
    assert top_source(kb, "nvidia-smi").endswith("gpu.txt")
    kb.close()
    remove_paths(kbs, "default", [docs / "gpu.txt"])
    kb = kbs.open("default")
    try:
        assert kb.lexical_search("nvidia-smi", 3) == []
        assert lexical_dirs(kb) == [f"lexical.{kb.store.generation()}"]  # older generations cleaned up
        assert kb.check_consistency() == []
    finally:
        kb.close()
    manifest = rebuild(kbs, "default", embedder)
    kb = kbs.open("default")
    try:
        assert kb.manifest.store == manifest.store
        assert lexical_dirs(kb) == [f"lexical.{kb.store.generation()}"]
        assert top_source(kb, "无理由退款").endswith("refund.txt")
        assert kb.check_consistency() == []
    finally:
        kb.close()


def test_stale_saved_index_is_rebuilt_and_readers_never_write(settings, docs, embedder):
    kbs = KnowledgeBases.from_settings(settings)
    ingest(kbs, [docs / "refund.txt"], embedder)
    kb = kbs.open("default")
    store_dir, old = kb.store_dir, kb.store.generation()
    kb.close()
    ingest(kbs, [docs], embedder)
    # Simulate a kill after the store committed but before the index was saved: only an old folder is left.
    old_copy = LexicalIndex.build(np.array([1]), [["退款"]])
    for path in store_dir.glob("lexical.*"):
        path.rename(store_dir / f"gone-{path.name}")
    old_copy.save(store_dir / f"lexical.{old}")
    kb = kbs.open("default")
    try:
        assert top_source(kb, "cli_demo.py").endswith("gpu.txt")  # rebuilt in memory from stored tokens
        assert kb.check_consistency() == []
        assert lexical_dirs(kb) == [f"lexical.{old}"]  # the reader wrote nothing
    finally:
        kb.close()
    with kbs.writer("default") as writer:
        generation = writer.store.generation()  # a writer closing brings the saved copy up to date
    assert sorted(p.name for p in store_dir.glob("lexical.*")) == [f"lexical.{generation}"]


def test_corrupt_saved_index_is_ignored(settings, docs, embedder):
    kbs = KnowledgeBases.from_settings(settings)
    ingest(kbs, [docs], embedder)
    kb = kbs.open("default")
    (kb.store_dir / f"lexical.{kb.store.generation()}" / "lexical.json").write_text("{broken")
    kb.close()
    kb = kbs.open("default")
    try:
        assert top_source(kb, "cli_demo.py").endswith("gpu.txt")
        assert kb.check_consistency() == []
    finally:
        kb.close()


def test_stores_without_a_tokens_column_still_work(settings, docs, embedder):
    kbs = KnowledgeBases.from_settings(settings)
    ingest(kbs, [docs], embedder)
    kb = kbs.open("default")
    db = kb.store.path
    kb.close()
    with sqlite3.connect(db) as conn:  # what a store made before the lexical index looks like
        conn.execute("ALTER TABLE chunks DROP COLUMN tokens")
    for path in db.parent.glob("lexical.*"):
        for file in path.iterdir():
            file.unlink()
        path.rmdir()
    with kbs.writer("default") as writer:  # adds the column back (NULL tokens are computed on read)
        assert writer.lexical_search("cli_demo.py", 1)
    kb = kbs.open("default")
    try:
        assert top_source(kb, "cli_demo.py").endswith("gpu.txt")
        assert kb.check_consistency() == []
    finally:
        kb.close()


def test_streaming_build_scores_exactly_like_bm25s_on_token_lists():
    import bm25s

    texts = [REFUND, GPU, WEATHER, REFUND + GPU, "退款 退款 退款", "无关"]
    token_lists = [tokenize(t) for t in texts]
    reference = bm25s.BM25()
    reference.index(token_lists, show_progress=False)
    index = LexicalIndex.build_streaming((10 + n, tokens) for n, tokens in enumerate(token_lists))
    assert index.ids().tolist() == [10, 11, 12, 13, 14, 15]
    for query in ("退款", "nvidia-smi 显存", "http/2 beijing", "申请 退款 账户"):
        tokens = tokenize(query)
        expected = reference.get_scores_from_ids(reference.get_tokens_ids(tokens))
        assert np.array_equal(index._bm25.get_scores_from_ids(index._bm25.get_tokens_ids(tokens)), expected)
