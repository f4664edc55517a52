"""A real knowledge base (SQLite store + FAISS index, through KnowledgeBase) at 1M chunks.

    python -m bench.kb_scale [--chunks 1000000] [--per-document 100]

Vectors are synthetic (clustered, normalised, dim 384) so the run measures the
store and the index, not the embedder. Reports: time to fill (including the
flat → IVF switch and retraining as the index grows), reopen time, search p50/p99
through ``KnowledgeBase.search`` (FAISS + fetching the chunk rows) with recall@10
of the index against exact search over the same vectors, consistency, disk size
and peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from bench.report import markdown_table, write_section
from ingest.pipeline import IndexableChunk
from memory.knowledge_base import DocumentUpdate, KnowledgeBases, Manifest
from settings import Settings

DIM = 384


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    picks = rng.integers(0, len(centres), n)
    x = centres[picks] + rng.normal(0, 0.05, (n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(kbs: KnowledgeBases, chunks: int, per_document: int, rng, centres) -> float:
    manifest = Manifest("scale", "synthetic", DIM, 400, 80, "store-1")
    started = time.perf_counter()
    with kbs.writer("scale", create=manifest) as kb:
        for first in range(0, chunks, per_document * 50):
            updates = []
            for doc in range(first, min(first + per_document * 50, chunks), per_document):
                vectors = clustered(rng, centres, per_document)
                new = tuple(
                    IndexableChunk(o, f"文档{doc}第{o}块", hashlib.sha256(f"{doc}-{o}".encode()).hexdigest(), (1,), o * 320, o * 320 + 400)
                    for o in range(len(vectors))
                )
                updates.append(DocumentUpdate(f"/synthetic/doc{doc:07d}.txt", "0" * 64, 1, "ok", None, new, vectors))
            kb.put_documents(updates)
            done = min(first + per_document * 50, chunks)
            if done % 100_000 < per_document * 50:
                print(f"  {done:,} chunks, index {kb.index.kind}, {time.perf_counter() - started:.0f} s", flush=True)
    return time.perf_counter() - started


def measure(kbs: KnowledgeBases, queries: np.ndarray) -> dict:
    started = time.perf_counter()
    kb = kbs.open("scale")
    reopen = time.perf_counter() - started
    try:
        latencies, found = [], []
        for query in queries:
            t = time.perf_counter()
            hits = kb.search(query, 10)
            latencies.append((time.perf_counter() - t) * 1000)
            found.append([h.chunk.id for h in hits])
        ids, vectors = kb.store.all_vectors(DIM)
        exact = faiss.IndexFlatIP(DIM)
        exact.add(vectors)
        _, truth = exact.search(queries, 10)
        recall = np.mean([len(set(f) & set(ids[t].tolist())) / 10 for f, t in zip(found, truth)])
        return {
            "chunks": f"{len(kb.index):,}",
            "index": kb.index.kind,
            "reopen s": f"{reopen:.1f}",
            "search p50 ms": f"{np.percentile(latencies, 50):.2f}",
            "search p99 ms": f"{np.percentile(latencies, 99):.2f}",
            "recall@10": f"{recall:.3f}",
            "consistent": "yes" if not kb.check_consistency() else "NO",
        }
    finally:
        kb.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--per-document", type=int, default=100)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    centres = rng.normal(0, 1, (3000, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    defaults = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        kbs = KnowledgeBases(Path(tmp), exact_max=defaults.exact_search_max_chunks, nprobe=defaults.ivf_nprobe)
        fill_s = fill(kbs, args.chunks, args.per_document, rng, centres)
        row = {"fill s": f"{fill_s:.0f}", **measure(kbs, clustered(rng, centres, args.queries))}
        row["disk MB"] = f"{sum(p.stat().st_size for p in Path(tmp).rglob('*') if p.is_file()) / 2**20:,.0f}"
    row["peak RSS MB"] = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f}"
    body = (
        f"Synthetic clustered vectors (dim {DIM}), {args.per_document} chunks per document, documents committed "
        f"50 at a time through `KnowledgeBase.put_documents`; exact search up to {defaults.exact_search_max_chunks:,} "
        f"chunks, then IVF with nprobe {defaults.ivf_nprobe}. Search latency includes fetching the chunk rows from SQLite.\n\n"
        + markdown_table([row])
    )
    print(body)
    write_section("kb_scale", "A knowledge base of 1M chunks", "python -m bench.kb_scale", body)


if __name__ == "__main__":
    main()
