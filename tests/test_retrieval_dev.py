"""Dense retrieval on ../shared/eval/dev.jsonl: reports hit@5 with the default chunking."""

from __future__ import annotations

import pytest

from memory.evaluation import hit_rate, load_questions
from memory.ingestion import add_paths
from memory.knowledge_base import KnowledgeBases
from rag.retrieval import Retriever

pytestmark = pytest.mark.slow

# Measured with the default settings (see docs/BENCHMARKS.md, "Chunking"); a drop below
# this floor means a change made retrieval worse.
HIT_AT_5_FLOOR = 0.6  # measured 0.655 at 600/120


def dense_search(kb, embedder, query: str, top_k: int, step: int = 0):
    """The raw vector hits of one opened knowledge base (``ingest search --dense-only``)."""
    return Retriever(None, embedder).dense_hits(kb, query, top_k=top_k, step=step)


def test_dense_hit_at_5_on_dev_questions(settings, embedder, shared_dir):
    kbs = KnowledgeBases.from_settings(settings)
    report = add_paths(
        kbs,
        "dev",
        [shared_dir / "corpus" / "zh", shared_dir / "corpus" / "pdfs"],
        embedder,
        chunk_size=settings.chunk_size,
        chunk_overlap=settings.chunk_overlap,
    )
    assert report.count("ingested") >= 15
    kb = kbs.open("dev")
    try:
        questions = load_questions(shared_dir / "eval" / "dev.jsonl")
        rate, misses = hit_rate(questions, lambda q: [r.text for r in dense_search(kb, embedder, q, top_k=5)])
    finally:
        kb.close()
    print(f"\ndense hit@5 on dev.jsonl: {rate:.3f} (misses: {', '.join(misses)})")
    assert rate >= HIT_AT_5_FLOOR
