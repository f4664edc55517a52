"""Hybrid retrieval (rag.retrieval) on the real embedder, over both backends (local and embedded
Milvus): fusion, threshold, merging, reranker plumbing."""

from __future__ import annotations

from pathlib import Path

import pytest

from memory.ingestion import add_paths
from memory.knowledge_base import KnowledgeBases
from rag.retrieval import Candidate, FusionWeights, Passage, Retriever, fuse_rankings, merge_into_passages

REFUND = "退款政策\n\n购买后七天内可以申请无理由退款。退款会在三个工作日内原路退回到您的支付账户。"
FAILURES = ["磁盘配额已满", "网络连接超时", "证书已经过期", "内存不足", "权限被拒绝", "配置文件缺失", "端口被占用", "数据库锁等待"]


@pytest.fixture(params=["local", "milvus"])
def kbs(request, settings, tmp_path, embedder):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "refund.txt").write_text(REFUND, encoding="utf-8")
    for n, failure in enumerate(FAILURES):
        code = f"ZK-{4400 + n * 7}"
        (folder / f"error{n}.txt").write_text(f"错误码说明\n\n错误码 {code} 表示{failure}，请联系管理员处理。", encoding="utf-8")
    long_text = "".join(f"第{i}节介绍编号{i}的主题，内容各不相同。" for i in range(30))
    (folder / "long.txt").write_text(long_text, encoding="utf-8")
    knowledge_bases = KnowledgeBases.from_settings(settings.model_copy(update={"vector_store": request.param}))
    add_paths(knowledge_bases, "kb", [folder], embedder, chunk_size=60, chunk_overlap=15)
    yield knowledge_bases
    knowledge_bases.close()


@pytest.fixture
def retriever(kbs, embedder):
    retriever = Retriever(kbs, embedder, recall_k=10, top_k=3, weights=FusionWeights(1.0, 0.5, 60, method="rrf"))
    yield retriever
    retriever.close()


def test_fusion_adds_weighted_reciprocal_ranks():
    fused = fuse_rankings([1, 2], [2, 3], FusionWeights(1.0, 1.0, 0, method="rrf"))
    assert [i for i, _ in fused] == [2, 1, 3]
    assert fused[0][1] == pytest.approx(1 / 2 + 1 / 1)
    assert [i for i, _ in fuse_rankings([1, 2], [2, 3], FusionWeights(1.0, 0.0, 0, method="rrf"))][:2] == [1, 2]


def test_exact_identifier_comes_back_first(retriever, kbs):
    code = "ZK-4435"  # error5: 配置文件缺失
    passages = retriever.retrieve("kb", f"{code} 是什么意思")
    assert code in passages[0].text
    kb = kbs.open("kb")
    try:
        top_lexical = kb.lexical_search(code, 1)[0][0]
        assert code in kb.chunks([top_lexical])[top_lexical].text
    finally:
        kb.close()


class OffTopicQueries:
    """The real embedder, but every query is embedded as an unrelated question: dense recall misses."""

    def __init__(self, inner):
        self.inner = inner

    def embed_queries(self, texts):
        return self.inner.embed_queries(["今天北京的天气怎么样"] * len(texts))


def test_identifier_only_bm25_finds_comes_back(kbs, embedder):
    code = "ZK-4435"
    kb = kbs.open("kb")
    retriever = Retriever(kbs, OffTopicQueries(embedder), recall_k=3, weights=FusionWeights(1.0, 0.5, 60, method="rrf"))
    dense_only = Retriever(kbs, OffTopicQueries(embedder), recall_k=3, weights=FusionWeights(1.0, 0.0, 60, method="rrf"))
    try:
        assert not any(code in p.text for p in dense_only.retrieve(kb, code, top_k=5))
        assert any(code in p.text for p in retriever.retrieve(kb, code, top_k=5))
    finally:
        kb.close()


def test_paraphrase_only_dense_finds_comes_back(retriever, kbs):
    question = "买了东西后悔了，怎么把钱要回来"
    kb = kbs.open("kb")
    try:
        lexical_sources = {kb.chunks([i])[i].path for i, _ in kb.lexical_search(question, 10)}
    finally:
        kb.close()
    assert not any(s.endswith("refund.txt") for s in lexical_sources)  # BM25 alone cannot find it
    assert retriever.retrieve("kb", question)[0].source.endswith("refund.txt")


def test_every_passage_carries_its_dense_cosine(retriever, kbs, embedder):
    kb = kbs.open("kb")
    try:
        query = "ZK-4414 怎么处理"
        vector = embedder.embed_queries([query])[0]
        for passage in retriever.retrieve(kb, query, top_k=5):
            stored = kb.chunk_vectors([passage.chunk_ids[0]])[0]
            assert passage.score == pytest.approx(float(stored @ vector), abs=1e-4)
            assert -1.0 <= passage.score <= 1.0
    finally:
        kb.close()


def test_threshold_drops_low_passages_and_can_leave_nothing(retriever):
    everything = retriever.retrieve("kb", "退款", top_k=3)
    assert everything
    cut = everything[0].score - 1e-6
    kept = retriever.retrieve("kb", "退款", top_k=3, score_threshold=cut)
    assert kept and all(p.score >= cut for p in kept)
    assert retriever.retrieve("kb", "退款", score_threshold=0.999) == []


def test_adjacent_hits_of_one_document_merge_into_one_passage(kbs):
    kb = kbs.open("kb")
    try:
        (long_doc,) = [d for d in kb.documents() if d.path.endswith("long.txt")]
        chunks = {c.ordinal: c for c in kb.chunks_of_document(long_doc.id, 0, long_doc.chunk_count)}
        ranked = [Candidate(chunks[o], 0.5, 1.0 / (1 + n)) for n, o in enumerate([3, 12, 4, 6])]
        passages = merge_into_passages(kb, ranked, top_k=2, step=0, char_budget=1500)
        assert [p.chunk_ids for p in passages] == [(chunks[3].id, chunks[4].id), (chunks[12].id,)]
        assert passages[0].text in kb.expand(chunks[3], 1, 10_000) and chunks[4].text[-5:] in passages[0].text
        # with one neighbour on each side, hits 4 and 6 touch (via 5) and 12 stays apart
        widened = merge_into_passages(kb, ranked, top_k=3, step=1, char_budget=10_000)
        assert [p.chunk_ids for p in widened] == [(chunks[3].id, chunks[4].id, chunks[6].id), (chunks[12].id,)]
    finally:
        kb.close()


def test_lower_ranked_hit_joins_a_chosen_passage_after_the_slots_are_taken(kbs):
    kb = kbs.open("kb")
    try:
        documents = {Path(d.path).name: d for d in kb.documents()}
        long_doc = documents["long.txt"]
        chunks = {c.ordinal: c for c in kb.chunks_of_document(long_doc.id, 0, long_doc.chunk_count)}
        refund = kb.chunks_of_document(documents["refund.txt"].id, 0, 0)[0]
        # two slots: 3 and 12 take them; the refund chunk and 9 find none, yet 4 (ranked after them) touches 3
        ranked = [Candidate(c, 0.5, 1.0 / (1 + n)) for n, c in enumerate([chunks[3], chunks[12], refund, chunks[9], chunks[4]])]
        passages = merge_into_passages(kb, ranked, top_k=2, step=0, char_budget=1500)
        assert [p.chunk_ids for p in passages] == [(chunks[3].id, chunks[4].id), (chunks[12].id,)]
        assert chunks[4].text[-5:] in passages[0].text and not any(p.source.endswith("refund.txt") for p in passages)
    finally:
        kb.close()


def test_passage_fields(retriever):
    passage = retriever.retrieve("kb", "退款多久到账", top_k=1)[0]
    assert isinstance(passage, Passage)
    assert passage.source.endswith("refund.txt") and passage.page is None and passage.pages == ()
    assert passage.rank_score > 0 and passage.chunk_ids
    assert set(passage.to_dict()) == {"text", "source", "pages", "page", "score", "rank_score", "chunk_ids", "ocr_pages"}
    assert passage.ocr_pages == ()  # a text file: no page was read by OCR


def tiny_cross_encoder(folder):
    """A random-weight BERT cross-encoder saved locally: only the plumbing is under test."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(REFUND + "".join(FAILURES) + "错误码退款钱") - set(" \n"))
    (folder / "vocab.txt").write_text("\n".join(vocab), encoding="utf-8")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_reranker_reorders_the_recalled_set(kbs, embedder, settings, tmp_path):
    path = tiny_cross_encoder(tmp_path / "reranker")
    configured = settings.model_copy(update={"reranker_model": str(path), "recall_k": 10, "top_k": 4})
    retriever = Retriever.from_settings(configured, kbs, embedder)
    try:
        assert retriever.reranker is not None
        kb = kbs.open("kb")
        try:
            candidates = retriever.candidates(kb, "错误码是什么")
            expected = retriever.reranker.predict([("错误码是什么", c.chunk.text) for c in candidates])
        finally:
            kb.close()
        scores = [c.rank_score for c in candidates]
        assert scores == sorted(scores, reverse=True)
        assert sorted(scores) == pytest.approx(sorted(float(s) for s in expected), abs=1e-5)
        passages = retriever.retrieve("kb", "错误码是什么")
        assert passages and passages[0].rank_score == pytest.approx(scores[0], abs=1e-5)
    finally:
        retriever.close()
