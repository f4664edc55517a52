"""The two knowledge-base backends in one run on the same data: local (SQLite + FAISS + BM25)
against Milvus (embedded milvus-lite).

    python -m bench.backends [--chunks 100000 ...] [--queries 200] [--skip-quality]

1. **Scale**, per size: synthetic chunks (Chinese text drawn from a vocabulary, so BM25 has
   terms to rank; clustered normalised vectors, dim 384) committed 50 documents of 100
   chunks at a time through ``KnowledgeBase.put_documents``. Reports fill throughput,
   hybrid search latency (``Retriever.retrieve``: dense + BM25 recall 30, fusion, merging,
   neighbour fetch; top_k 5, step 1) with each query's vector given, so the embedder is not
   measured, and recall@10 of ``KnowledgeBase.search`` against exact search.
2. **Milvus' exact-search threshold**: one growing Milvus knowledge base; at each size its
   dense search (``KnowledgeBase.search``, k 10) is timed on FLAT and then on HNSW, with
   HNSW's recall@10 against FLAT's answers, so the size above which HNSW pays is measured
   rather than borrowed from the local one.
3. **Quality**, the same chunks and vectors in both backends (the Milvus copy is made from
   the local one): InsuranceQA validation MRR@10 (hybrid, per language) and
   ../shared/eval/dev.jsonl hit@5 (hybrid, step 1, over ../shared/corpus).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import random
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench import insuranceqa
from bench.report import markdown_table, write_section
from ingest.pipeline import IndexableChunk
from memory.knowledge_base import DocumentUpdate, KnowledgeBases, Manifest
from memory.milvus_backend import HNSW_EF, MilvusConnection
from rag.retrieval import Retriever
from settings import Settings

DIM = 384
PER_DOCUMENT = 100
DOCUMENTS_PER_COMMIT = 50
SHARED = Path(__file__).resolve().parents[2] / "shared"
VOCABULARY = (
    "知识库 检索 向量 模型 微调 显卡 文档 问答 训练 推理 切分 嵌入 索引 数据 服务 接口 用户 系统 中文 段落 "
    "保险 理赔 退款 合同 条款 发票 报销 审批 流程 权限 日志 备份 恢复 集群 副本 延迟 吞吐 内存 磁盘 网络"
).split()


class GivenQueryVectors:
    """Stands in for the embedder: each query's vector is known in advance (the benchmark measures the backends)."""

    model_id = "synthetic"
    dimension = DIM

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def embed_queries(self, texts):
        return np.stack([self.vectors[t] for t in texts])


def catalogue(home: Path, backend: str, settings: Settings, exact_max: int | None = None) -> KnowledgeBases:
    milvus = MilvusConnection(str(home / "milvus.db")) if backend == "milvus" else None
    local_max = settings.exact_search_max_chunks if exact_max is None else exact_max
    milvus_max = settings.milvus_exact_search_max_chunks if exact_max is None else exact_max
    return KnowledgeBases(home / "kb", exact_max=local_max, milvus_exact_max=milvus_max, nprobe=settings.ivf_nprobe,
                          default_backend=backend, milvus=milvus)


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 0.05, (n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sentence(rng: random.Random) -> str:
    return "".join(rng.choices(VOCABULARY, k=rng.randint(8, 20))) + "。"


# ---- 1. scale ---------------------------------------------------------------------
def fill(kbs: KnowledgeBases, backend: str, chunks: int, seed: int, first_chunk: int = 0) -> float:
    """Commit synthetic chunks ``first_chunk`` … ``chunks`` (the same for every backend: seeded); seconds taken."""
    rng, words = np.random.default_rng(seed), random.Random(seed)
    centres = clustered(np.random.default_rng(0), np.eye(DIM, dtype=np.float32), 3000)
    manifest = Manifest("scale", "synthetic", DIM, 400, 80, "store-1", backend=backend)
    started = time.perf_counter()
    with kbs.writer("scale", create=manifest) as kb:
        for first in range(first_chunk, chunks, PER_DOCUMENT * DOCUMENTS_PER_COMMIT):
            updates = []
            for doc in range(first, min(first + PER_DOCUMENT * DOCUMENTS_PER_COMMIT, chunks), PER_DOCUMENT):
                vectors = clustered(rng, centres, PER_DOCUMENT)
                texts = [sentence(words) for _ in range(PER_DOCUMENT)]
                new = tuple(
                    IndexableChunk(o, t, hashlib.sha256(t.encode()).hexdigest(), (), o * 100, o * 100 + len(t))
                    for o, t in enumerate(texts)
                )
                updates.append(DocumentUpdate(f"/synthetic/doc{doc:07d}.txt", "0" * 64, 1, "ok", None, new, vectors))
            kb.put_documents(updates)
    return time.perf_counter() - started


def measure_scale(kbs: KnowledgeBases, settings: Settings, queries: int, seed: int) -> dict:
    kb = kbs.open("scale")
    try:
        stored = kb.all_chunks()
        ids = np.array([c.id for c in stored])
        vectors = kb.chunk_vectors(ids.tolist())
        rng, words = np.random.default_rng(seed), random.Random(seed)
        picks = rng.integers(0, len(stored), queries)
        query_vectors = vectors[picks] + rng.normal(0, 0.02, (queries, DIM)).astype(np.float32)
        query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
        texts = ["".join(words.sample(VOCABULARY, 3)) + f"？{n}" for n in range(queries)]
        retriever = Retriever.from_settings(settings, kbs, GivenQueryVectors(dict(zip(texts, query_vectors))))
        retriever.retrieve(kb, texts[0])  # warm: first searches load indexes
        latencies = []
        for text in texts:
            started = time.perf_counter()
            retriever.retrieve(kb, text, top_k=5, step=1)
            latencies.append((time.perf_counter() - started) * 1000)
        truth = np.argsort(-(query_vectors @ vectors.T), axis=1)[:, :10]
        found = [[h.chunk.id for h in kb.search(q, 10)] for q in query_vectors]
        recall = np.mean([len(set(f) & set(ids[t].tolist())) / 10 for f, t in zip(found, truth)])
        return {
            "hybrid p50 ms": f"{np.percentile(latencies, 50):.1f}",
            "hybrid p99 ms": f"{np.percentile(latencies, 99):.1f}",
            "dense recall@10": f"{recall:.3f}",
            "consistent": "yes" if not kb.check_consistency() else "NO",
        }
    finally:
        kb.close()


def scale_rows(sizes: list[int], queries: int, settings: Settings) -> list[dict]:
    rows = []
    for chunks in sizes:
        for backend in ("local", "milvus"):
            # each row in a fresh process: its own peak RSS, nothing left over from the row before
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                row = pool.submit(scale_row, chunks, backend, queries, settings).result()
            print(row, flush=True)
            rows.append(row)
        local, milvus = rows[-2], rows[-1]  # the named baseline is local, measured in the same run
        local["vs local"] = "1"
        milvus["vs local"] = (
            f"fill {float(milvus['chunks/s'].replace(',', '')) / float(local['chunks/s'].replace(',', '')):.2f}×, "
            f"p50 {float(milvus['hybrid p50 ms']) / float(local['hybrid p50 ms']):.0f}× slower"
        )
    return rows


def scale_row(chunks: int, backend: str, queries: int, settings: Settings) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        kbs = catalogue(Path(tmp), backend, settings)
        seconds = fill(kbs, backend, chunks, seed=chunks)
        row = {"chunks": f"{chunks:,}", "backend": backend, "fill s": f"{seconds:.0f}", "chunks/s": f"{chunks / seconds:,.0f}"}
        row |= measure_scale(kbs, settings, queries, seed=1)
        row["disk MB"] = f"{sum(p.stat().st_size for p in Path(tmp).rglob('*') if p.is_file()) / 2**20:,.0f}"
        kbs.close()
    row["peak RSS MB"] = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f}"
    return row


# ---- 2. Milvus' exact-search threshold --------------------------------------------
def timed_dense(kb, query_vectors: np.ndarray) -> tuple[list[list[int]], float, float]:
    kb.search(query_vectors[0], 10)  # warm: the first search after an index change loads it
    found, latencies = [], []
    for q in query_vectors:
        started = time.perf_counter()
        found.append([h.chunk.id for h in kb.search(q, 10)])
        latencies.append((time.perf_counter() - started) * 1000)
    return found, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def milvus_threshold_rows(sizes: list[int], queries: int, settings: Settings) -> list[dict]:
    rows, filled = [], 0
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as tmp:
        for chunks in sorted(sizes):
            exact = catalogue(Path(tmp), "milvus", settings, exact_max=10**12)  # writer close: FLAT
            fill(exact, "milvus", chunks, seed=chunks, first_chunk=filled)
            filled = chunks
            kb = exact.open("scale")
            stored_vectors = kb.chunk_vectors(rng.choice([c.id for c in kb.all_chunks()], queries).tolist())
            query_vectors = stored_vectors + rng.normal(0, 0.02, stored_vectors.shape).astype(np.float32)
            query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
            truth, flat_p50, flat_p99 = timed_dense(kb, query_vectors)
            kb.close()
            exact.close()
            approximate = catalogue(Path(tmp), "milvus", settings, exact_max=1)  # writer close: HNSW
            started = time.perf_counter()
            with approximate.writer("scale"):
                pass
            build = time.perf_counter() - started
            kb = approximate.open("scale")
            found, hnsw_p50, hnsw_p99 = timed_dense(kb, query_vectors)
            kb.close()
            approximate.close()
            recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
            row = {
                "chunks": f"{chunks:,}",
                "FLAT p50 ms": f"{flat_p50:.1f}", "FLAT p99 ms": f"{flat_p99:.1f}",
                "HNSW p50 ms": f"{hnsw_p50:.1f}", "HNSW p99 ms": f"{hnsw_p99:.1f}",
                "HNSW recall@10": f"{recall:.3f}", "HNSW build s": f"{build:.0f}",
                "FLAT / HNSW p50": f"{flat_p50 / hnsw_p50:.2f}",
            }  # fmt: skip
            print(row, flush=True)
            rows.append(row)
    return rows


# ---- 3. quality -------------------------------------------------------------------
def copy_into(source: KnowledgeBases, target: KnowledgeBases, name: str) -> None:
    """The same documents, chunks and vectors in another backend (no re-embedding)."""
    manifest = source.manifest(name)
    kb = source.open(name)
    try:
        with target.writer(name, create=Manifest(**{**manifest.__dict__, "backend": target.default_backend})) as copy:
            for document in kb.documents():
                stored = kb.chunks_of_document(document.id, 0, document.chunk_count)
                chunks = tuple(IndexableChunk(c.ordinal, c.text, c.text_sha, c.pages, c.start, c.end) for c in stored)
                vectors = kb.chunk_vectors([c.id for c in stored]) if stored else None
                copy.put_documents([DocumentUpdate(document.path, document.sha256, document.size, document.status, document.error, chunks, vectors)])
    finally:
        kb.close()


def insuranceqa_mrr(kbs: KnowledgeBases, name: str, retriever: Retriever, questions: list[str], gold: list[set[str]]) -> float:
    total = 0.0
    for question, wanted in zip(questions, gold):
        sources = [Path(p.source).stem for p in retriever.retrieve(name, question, top_k=10, step=0, score_threshold=0)]
        rank = next((r for r, s in enumerate(sources, 1) if s in wanted), None)
        total += 1 / rank if rank else 0.0
    return total / len(questions)


def quality_rows(settings: Settings, home: Path, questions: int, pool: int) -> list[dict]:
    from memory.embedding import load_embedder
    from memory.evaluation import hit_rate, load_questions
    from memory.ingestion import add_paths

    embedder = load_embedder(settings)
    local, milvus = catalogue(home / "local", "local", settings), catalogue(home / "milvus", "milvus", settings)
    answers = insuranceqa.load("answers")
    valid = [q for _, q in sorted(insuranceqa.load("valid").items(), key=lambda kv: int(kv[0])) if q.get("answers")]
    valid = random.Random(0).sample(valid, questions)
    gold_ids = sorted({a for q in valid for a in q["answers"]}, key=int)
    others = sorted(set(answers) - set(gold_ids), key=int)
    pool_ids = gold_ids + random.Random(1).sample(others, max(0, pool - len(gold_ids)))
    rows = []
    for lang in ("zh", "en"):
        folder = home / f"insuranceqa-{lang}"
        folder.mkdir()
        for answer_id in pool_ids:
            (folder / f"{answer_id}.txt").write_text(answers[answer_id][lang].strip(), encoding="utf-8")
        name = f"insuranceqa-{lang}"
        add_paths(local, name, [folder], embedder, chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap)
        copy_into(local, milvus, name)
        row = {"measure": f"InsuranceQA {lang} valid MRR@10 ({questions} questions, {pool:,} answers)"}
        for backend, kbs in (("local", local), ("milvus", milvus)):
            retriever = Retriever.from_settings(settings, kbs, embedder)
            row[backend] = insuranceqa_mrr(kbs, name, retriever, [q[lang] for q in valid], [set(q["answers"]) for q in valid])
        rows.append(row)
        print(row, flush=True)
    if (SHARED / "eval" / "dev.jsonl").is_file():
        add_paths(local, "dev", [SHARED / "corpus" / "zh", SHARED / "corpus" / "pdfs"], embedder,
                  chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap)  # fmt: skip
        copy_into(local, milvus, "dev")
        dev = load_questions(SHARED / "eval" / "dev.jsonl")
        row = {"measure": "dev.jsonl hit@5 (hybrid, step 1)"}
        for backend, kbs in (("local", local), ("milvus", milvus)):
            retriever = Retriever.from_settings(settings, kbs, embedder)
            row[backend], _ = hit_rate(dev, lambda q: [p.text for p in retriever.retrieve("dev", q, top_k=5, step=1)])
        rows.append(row)
        print(row, flush=True)
    milvus.close()
    for row in rows:
        row["milvus − local"] = f"{row['milvus'] - row['local']:+.3f}"
        row["local"], row["milvus"] = f"{row['local']:.3f}", f"{row['milvus']:.3f}"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="*", default=[100_000], help="scale rows' sizes (none: skip)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--threshold-chunks", type=int, nargs="*", default=[10_000, 25_000, 50_000, 100_000, 200_000],
        help="sizes at which Milvus' FLAT and HNSW dense search are compared (none: skip)",
    )  # fmt: skip
    parser.add_argument("--questions", type=int, default=300, help="InsuranceQA validation questions per language")
    parser.add_argument("--pool", type=int, default=3000, help="InsuranceQA answers searched")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    settings = Settings()
    # each part writes its own section as soon as it is measured, so a partial run keeps the others
    parts = [
        ("backends", "Knowledge-base backends: local vs Milvus (milvus-lite)", args.chunks,
         lambda: render_scale(settings, args, scale_rows(args.chunks, args.queries, settings))),
        ("backends-threshold", "Milvus: exact (FLAT) vs HNSW dense search by size", args.threshold_chunks,
         lambda: render_threshold(settings, args, milvus_threshold_rows(args.threshold_chunks, args.queries, settings))),
        ("backends-quality", "Knowledge-base backends: retrieval quality, local vs Milvus", not args.skip_quality,
         lambda: render_quality(settings, quality_rows_in_temporary_home(settings, args))),
    ]  # fmt: skip
    command = f"python -m bench.backends {' '.join(sys.argv[1:])}".strip()
    for name, title, wanted, measure in parts:
        if wanted:
            body = measure()
            print(body, flush=True)
            if not args.no_write:
                write_section(name, title, command, body)


def quality_rows_in_temporary_home(settings: Settings, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        return quality_rows(settings, Path(tmp), args.questions, args.pool)


def render_scale(settings: Settings, args, scale: list[dict]) -> str:
    import milvus_lite
    import pymilvus

    return (
        f"pymilvus {pymilvus.__version__}, milvus-lite {milvus_lite.__version__} (embedded, in-process). Scale: synthetic "
        f"Chinese chunks and clustered vectors (dim {DIM}), {PER_DOCUMENT} chunks per document, {DOCUMENTS_PER_COMMIT} documents "
        f"per commit through `put_documents`; exact search up to {settings.exact_search_max_chunks:,} chunks locally (then IVF "
        f"nprobe {settings.ivf_nprobe}), up to {settings.milvus_exact_search_max_chunks:,} on Milvus (then HNSW ef {HNSW_EF}). Hybrid latency: `Retriever.retrieve`, "
        f"top_k 5, step 1, recall {settings.recall_k}, {args.queries} queries, query vectors given (no embedding). "
        "Each row runs in its own process (peak RSS: that process's, milvus-lite included).\n\n"
        + markdown_table(scale)
    )


def render_threshold(settings: Settings, args, threshold: list[dict]) -> str:
    return (
        f"Dense search only (`KnowledgeBase.search`, k 10, {args.queries} queries near stored vectors), one growing "
        f"milvus-lite knowledge base timed on FLAT, then on HNSW (M 16, efConstruction 200, ef {HNSW_EF}); recall against "
        f"FLAT's answers. zhiku switches to HNSW above `milvus_exact_search_max_chunks` ({settings.milvus_exact_search_max_chunks:,}).\n\n"
        + markdown_table(threshold)
    )


def render_quality(settings: Settings, quality: list[dict]) -> str:
    return (
        f"The same chunks and vectors in both ({settings.embedding_model}, chunk_size {settings.chunk_size}): "
        "hybrid retrieval with the default fusion. Local BM25 uses zhiku's tokenizer (jieba search mode + whole "
        "identifiers); Milvus its own BM25 function with the jieba analyzer (punctuation removed). "
        "Target: Milvus no worse than local by more than 0.01.\n\n" + markdown_table(quality)
    )


if __name__ == "__main__":
    main()
