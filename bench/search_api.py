"""``POST /v1/knowledge_bases/{kb}/search`` latency at 100k chunks.

    python -m bench.search_api [--chunks 100000] [--queries 200]

The knowledge base holds real text (InsuranceQA answers, Chinese and English,
cycled to the chunk count) so BM25 sees a real vocabulary, with synthetic
clustered vectors so filling it does not take an hour of embedding. Queries are
real InsuranceQA questions embedded by the bundled model. Measured: the HTTP
route on a live ``rag serve`` (embed the query, dense + BM25 recall, fusion,
SQLite rows, JSON) against the same ``Retriever.retrieve`` called in-process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench import insuranceqa
from bench.report import markdown_table, write_section
from bench.serve_load import start_server
from ingest.pipeline import IndexableChunk, text_sha256
from memory.knowledge_base import DocumentUpdate, KnowledgeBases, Manifest
from settings import BUNDLED_EMBEDDING_MODEL, Settings

DIM = 384
KB = "scale-100k"


def fill(settings: Settings, chunks: int, per_document: int = 50) -> float:
    answers = insuranceqa.load("answers")
    texts = [a[lang] for a in answers.values() for lang in ("zh", "en")]
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 1, (2000, DIM)).astype(np.float32)
    manifest = Manifest(KB, BUNDLED_EMBEDDING_MODEL, DIM, settings.chunk_size, settings.chunk_overlap, "store-1")
    started = time.perf_counter()
    with KnowledgeBases.from_settings(settings).writer(KB, create=manifest) as kb:
        for first in range(0, chunks, per_document * 40):
            updates = []
            for doc in range(first, min(first + per_document * 40, chunks), per_document):
                picks = centres[rng.integers(0, len(centres), per_document)] + rng.normal(0, 0.05, (per_document, DIM))
                vectors = (picks / np.linalg.norm(picks, axis=1, keepdims=True)).astype(np.float32)
                new = []
                for o in range(len(vectors)):
                    text = f"{texts[(doc + o) % len(texts)]} ({doc}-{o})"
                    new.append(IndexableChunk(o, text, text_sha256(text), (1,), o * 500, o * 500 + len(text)))
                updates.append(DocumentUpdate(f"/synthetic/doc{doc:06d}.txt", "0" * 64, 1, "ok", None, tuple(new), vectors))
            kb.put_documents(updates)
            print(f"  {min(first + per_document * 40, chunks):,} chunks, {time.perf_counter() - started:.0f} s", flush=True)
    return time.perf_counter() - started


def questions(count: int) -> list[str]:
    valid = list(insuranceqa.load("valid").values())
    return [row[lang] for row in valid[: count // 2] for lang in ("zh", "en")][:count]


def percentiles(latencies_ms: list[float]) -> dict:
    return {"p50 ms": f"{np.percentile(latencies_ms, 50):.1f}", "p99 ms": f"{np.percentile(latencies_ms, 99):.1f}"}


def over_http(url: str, queries: list[str], top_k: int) -> list[float]:
    latencies = []
    with httpx.Client(timeout=60) as http:
        http.post(f"{url}/v1/knowledge_bases/{KB}/search", json={"query": queries[0], "top_k": top_k})  # warm-up
        for query in queries:
            started = time.perf_counter()
            response = http.post(f"{url}/v1/knowledge_bases/{KB}/search", json={"query": query, "top_k": top_k})
            latencies.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
    return latencies


def in_process(settings: Settings, queries: list[str], top_k: int) -> list[float]:
    from memory.embedding import load_embedder
    from rag.retrieval import Retriever

    retriever = Retriever.from_settings(settings, KnowledgeBases.from_settings(settings), load_embedder(settings))
    retriever.retrieve(KB, queries[0], top_k=top_k)
    latencies = []
    for query in queries:
        started = time.perf_counter()
        retriever.retrieve(KB, query, top_k=top_k)
        latencies.append((time.perf_counter() - started) * 1000)
    retriever.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zhiku-search-bench-") as tmp:
        models = os.environ.get("ZHIKU_MODELS_DIR") or str(Settings().model_cache)
        settings = Settings(home=Path(tmp), models_dir=Path(models))
        fill_s = fill(settings, args.chunks)
        queries = questions(args.queries)
        server = start_server({**os.environ, "ZHIKU_HOME": tmp, "ZHIKU_MODELS_DIR": models}, args.port, kb=KB)
        try:
            http_ms = over_http(f"http://127.0.0.1:{args.port}", queries, args.top_k)
        finally:
            server.terminate()
            server.wait(timeout=60)
        local_ms = in_process(settings, queries, args.top_k)
    rows = [
        {"path": "HTTP /v1/knowledge_bases/{kb}/search", **percentiles(http_ms)},
        {"path": "Retriever.retrieve in-process (baseline)", **percentiles(local_ms)},
    ]
    added = np.percentile(http_ms, 50) - np.percentile(local_ms, 50)
    body = (
        f"{args.chunks:,} chunks (InsuranceQA answer texts, synthetic vectors; filled in {fill_s:.0f} s), "
        f"{len(queries)} real questions (zh + en), top_k {args.top_k}, hybrid dense + BM25 recall "
        f"{settings.recall_k} each. Sequential requests.\n\n{markdown_table(rows)}\n\n"
        f"HTTP adds {added:.1f} ms at p50 ({np.percentile(http_ms, 50) / np.percentile(local_ms, 50):.2f}× the in-process time)."
    )
    print(body)
    write_section("search_api", "Search over HTTP at 100k chunks", "python -m bench.search_api", body)


if __name__ == "__main__":
    main()
