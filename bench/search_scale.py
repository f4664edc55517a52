"""How vector search scales: exact (flat) vs IVF vs HNSW, on synthetic clustered embeddings.

Run::

    python -m bench.search_scale                          # 100k and 1M, ~15 min on 2 cores
    python -m bench.search_scale --sizes 100000 --out bench/out/small.md

The data imitate sentence embeddings (dim 384, L2-normalised): a shared
"anisotropy" direction, 64 topics each with its own 32-dimensional subspace of
variation, 4096 cluster centres of Zipf-like popularity, plus isotropic noise.
Queries are noisy copies of held-out points from the same distribution.
Recall@10 is measured against exact search over the same vectors.

Latency is of one query at a time (what a chat request does), after a warm-up,
at 1 and at 2 FAISS (OpenMP) threads. The IVF candidates are built with the
same helpers :class:`memory.vector_index.VectorIndex` uses.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import psutil

from bench.report import write_section

from memory.vector_index import DEFAULT_NPROBE, VectorIndex, new_ivf, nlist_for_size, training_sample

DIM = 384
K = 10
TOPICS = 64
CENTRES = 4096
LOCAL_DIM = 32
HNSW_M = 32
HNSW_MAX_BUILD_S = 600.0


# ---------------------------------------------------------------- data


@dataclass
class Mixture:
    """Parameters of the synthetic embedding distribution."""

    shared: np.ndarray  # (DIM,) direction every embedding leans towards
    centres: np.ndarray  # (CENTRES, DIM) unit
    topic_of_centre: np.ndarray  # (CENTRES,)
    bases: np.ndarray  # (TOPICS, LOCAL_DIM, DIM) subspace of variation per topic
    spread: np.ndarray  # (CENTRES,) scale of within-cluster variation
    weights: np.ndarray  # (CENTRES,) popularity, sums to 1


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_mixture(seed: int = 0) -> Mixture:
    """Random mixture parameters."""
    rng = np.random.default_rng(seed)
    shared = _unit(rng.standard_normal(DIM, dtype=np.float32))
    topics = _unit(rng.standard_normal((TOPICS, DIM), dtype=np.float32))
    topic_of_centre = rng.integers(0, TOPICS, CENTRES)
    offsets = _unit(rng.standard_normal((CENTRES, DIM), dtype=np.float32))
    centres = _unit(2.0 * shared + topics[topic_of_centre] + 0.9 * offsets).astype(np.float32)
    bases = _unit(rng.standard_normal((TOPICS, LOCAL_DIM, DIM), dtype=np.float32)) / np.sqrt(LOCAL_DIM)
    spread = rng.uniform(0.35, 0.7, CENTRES).astype(np.float32)
    weights = 1.0 / np.arange(1, CENTRES + 1) ** 0.6
    weights = rng.permutation(weights / weights.sum())
    return Mixture(shared, centres, topic_of_centre, bases.astype(np.float32), spread, weights)


def sample(mix: Mixture, n: int, rng: np.random.Generator, block: int = 100_000) -> np.ndarray:
    """``n`` normalised float32 points, rows in random order (any prefix is a random sample)."""
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        centre = rng.choice(CENTRES, size=stop - start, p=mix.weights)
        x = mix.centres[centre].copy()
        topic = mix.topic_of_centre[centre]
        z = rng.standard_normal((stop - start, LOCAL_DIM), dtype=np.float32)
        z *= mix.spread[centre, None]
        for t in np.unique(topic):
            rows = np.flatnonzero(topic == t)
            x[rows] += z[rows] @ mix.bases[t]
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(0.25 / np.sqrt(DIM))
        out[start:stop] = _unit(x)
    return out


def noisy_copies(points: np.ndarray, rng: np.random.Generator, noise: float = 0.2) -> np.ndarray:
    """Queries near held-out points: each point plus noise of norm ~``noise``, renormalised."""
    jitter = rng.standard_normal(points.shape, dtype=np.float32) * np.float32(noise / np.sqrt(DIM))
    return _unit(points + jitter).astype(np.float32)


# ---------------------------------------------------------------- measuring


def rss_mb() -> float:
    """Resident memory now, after returning freed heap to the OS where possible."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def index_mb(index: faiss.Index) -> float:
    """Serialised size of an index, counted without keeping a copy."""
    total = 0

    def count(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total / 2**20


def latencies_ms(search, queries: np.ndarray, threads: int, warmup: int = 20) -> tuple[float, float]:
    """p50 and p99 of one-query-at-a-time ``search(q, K)``."""
    faiss.omp_set_num_threads(threads)
    for q in queries[:warmup]:
        search(q[None, :], K)
    times = np.empty(len(queries))
    for i, q in enumerate(queries):
        q = q[None, :]
        t0 = time.perf_counter()
        search(q, K)
        times[i] = time.perf_counter() - t0
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k found."""
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth))
    return hits / truth.size


@dataclass
class Row:
    size: int
    index: str
    params: str
    p50_1: float
    p99_1: float
    p50_2: float
    p99_2: float
    recall: float | None
    build_s: float
    mb: float

    def markdown(self) -> str:
        recall = "1 (exact)" if self.recall is None else f"{self.recall:.3f}"
        return (
            f"| {self.size:,} | {self.index} | {self.params} | {self.p50_1:.2f} | {self.p99_1:.2f} "
            f"| {self.p50_2:.2f} | {self.p99_2:.2f} | {recall} | {self.build_s:.1f} | {self.mb:,.0f} |"
        )


HEADER = (
    "| chunks | index | params | p50 ms (1 thr) | p99 ms (1 thr) | p50 ms (2 thr) | p99 ms (2 thr) "
    "| recall@10 | build s | index MB |\n|---|---|---|---|---|---|---|---|---|---|"
)


def measure(size, name, params, search, lat_q, rec_q, truth, build_s, mb, log) -> Row:
    """One table row: latency at 1 and 2 threads, recall@10 on ``rec_q`` (batched)."""
    p50_1, p99_1 = latencies_ms(search, lat_q, 1)
    p50_2, p99_2 = latencies_ms(search, lat_q, 2)
    recall = None if truth is None else recall_at_k(search(rec_q, K)[1], truth)
    row = Row(size, name, params, p50_1, p99_1, p50_2, p99_2, recall, build_s, mb)
    log(row.markdown())
    return row


# ---------------------------------------------------------------- candidates


def bench_flat(size, base, lat_q, rec_q, log):
    """Exact search; returns its row and the exact top-K of ``rec_q``."""
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(DIM)
    index.add(base)
    build = time.perf_counter() - t0
    truth = index.search(rec_q, K)[1]
    row = measure(size, "flat", "-", index.search, lat_q, rec_q, None, build, index_mb(index), log)
    return row, truth


def bench_ivf(size, base, lat_q, rec_q, truth, nprobes, log, sq8: bool):
    """IVF-Flat (the default kind) at several nprobe, then IVF-SQ8 reusing its centroids."""
    nlist = nlist_for_size(size)
    rows = []
    t0 = time.perf_counter()
    ivf = new_ivf(DIM, nlist)
    ivf.train(training_sample(base, nlist))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ivf.add_with_ids(base, np.arange(size, dtype=np.int64))
    add_s = time.perf_counter() - t0
    log(f"  ivf{nlist}: train {train_s:.1f} s, add {add_s:.1f} s")
    mb = index_mb(ivf)
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        rows.append(
            measure(size, f"ivf{nlist},flat", f"nprobe={nprobe}", ivf.search, lat_q, rec_q, truth,
                    train_s + add_s, mb, log)
        )
    wrapped = VectorIndex(ivf)
    wrapped.nprobe = DEFAULT_NPROBE
    rows.append(
        measure(size, "VectorIndex default", f"{wrapped.kind}, nprobe={DEFAULT_NPROBE}", wrapped.search,
                lat_q, rec_q, truth, train_s + add_s, mb, log)
    )
    if sq8:
        quantizer = faiss.IndexFlatIP(DIM)
        quantizer.add(ivf.quantizer.reconstruct_n(0, nlist))
        del wrapped, ivf
        gc.collect()
        t0 = time.perf_counter()
        sq = faiss.IndexIVFScalarQuantizer(quantizer, DIM, nlist, faiss.ScalarQuantizer.QT_8bit,
                                           faiss.METRIC_INNER_PRODUCT)
        sq.train(training_sample(base, nlist))  # coarse centroids are reused; only SQ ranges train
        sq.add(base)
        sq_s = time.perf_counter() - t0 + train_s
        mb = index_mb(sq)
        for nprobe in nprobes:
            sq.nprobe = nprobe
            rows.append(
                measure(size, f"ivf{nlist},sq8", f"nprobe={nprobe}", sq.search, lat_q, rec_q, truth,
                        sq_s, mb, log)
            )
    return rows


def bench_hnsw(size, base, lat_q, rec_q, truth, ef_searches, log, per_vector_s):
    """HNSW M=32; skipped when the build is projected to exceed 10 minutes."""
    if per_vector_s is not None:
        projected = per_vector_s * size * np.log(size) / np.log(100_000)
        if projected > HNSW_MAX_BUILD_S:
            log(f"  hnsw: skipped at {size:,}, build projected at {projected:.0f} s (> {HNSW_MAX_BUILD_S:.0f} s)")
            return [], per_vector_s
    index = faiss.IndexHNSWFlat(DIM, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    index.add(base)
    build = time.perf_counter() - t0
    per_vector_s = build / size * np.log(100_000) / np.log(size)
    mb = index_mb(index)
    rows = []
    for ef in ef_searches:
        index.hnsw.efSearch = ef
        rows.append(
            measure(size, f"hnsw{HNSW_M}", f"efSearch={ef}", index.search, lat_q, rec_q, truth, build, mb, log)
        )
    return rows, per_vector_s


def bench_threshold(sizes, data, lat_q, log):
    """Flat p50/p99 per size, to place the exact-search threshold."""
    log("| chunks | flat p50 ms (1 thr) | p99 ms (1 thr) | p50 ms (2 thr) | p99 ms (2 thr) |")
    log("|---|---|---|---|---|")
    for size in sizes:
        index = faiss.IndexFlatIP(DIM)
        index.add(data[:size])
        p50_1, p99_1 = latencies_ms(index.search, lat_q, 1)
        p50_2, p99_2 = latencies_ms(index.search, lat_q, 2)
        log(f"| {size:,} | {p50_1:.2f} | {p99_1:.2f} | {p50_2:.2f} | {p99_2:.2f} |")
        del index


def data_stats(base: np.ndarray, queries: np.ndarray, truth: np.ndarray, rng) -> str:
    """Cosine statistics showing how embedding-like the data are."""
    pairs = rng.integers(0, len(base), (2, 2000))
    random_cos = np.einsum("ij,ij->i", base[pairs[0]], base[pairs[1]])
    top = np.einsum("ij,ikj->ik", queries, base[truth])
    return (
        f"cosine of random pairs: mean {random_cos.mean():.2f}, p99 {np.percentile(random_cos, 99):.2f}; "
        f"query to its 1st / 10th exact neighbour: mean {top[:, 0].mean():.2f} / {top[:, -1].mean():.2f}"
    )


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--threshold-sizes", type=int, nargs="*", default=[25_000, 50_000, 100_000, 200_000, 500_000])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument("--recall-queries", type=int, default=1000)
    parser.add_argument("--no-hnsw", action="store_true")
    parser.add_argument("--no-sq8", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/out/search_scale.md"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    out: list[str] = []

    def log(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    log("# Vector search scale")
    log()
    log(f"dim {DIM}, k {K}, {os.cpu_count()} CPUs, faiss {faiss.__version__}, "
        f"load average at start {os.getloadavg()[0]:.1f}; "
        f"{args.latency_queries} single queries for latency, {args.recall_queries} for recall@10.")
    rng = np.random.default_rng(1)
    mix = make_mixture()
    n = max(args.sizes + args.threshold_sizes)
    t0 = time.perf_counter()
    data = sample(mix, n, rng)
    held_out = sample(mix, max(args.latency_queries, args.recall_queries), rng)
    rec_q = noisy_copies(held_out[: args.recall_queries], rng)
    lat_q = rec_q[: args.latency_queries]
    log(f"generated {n:,} vectors in {time.perf_counter() - t0:.0f} s; RSS {rss_mb():,.0f} MB")
    log()
    log("Latency is per single query; \"VectorIndex default\" searches through the wrapper, which runs "
        "searches of < 20 queries on one thread, so its 2-thread columns are 1-thread too.")
    log()
    log(HEADER)
    rows, per_vector_s = [], None
    for size in sorted(args.sizes):
        base = data[:size]
        row, truth = bench_flat(size, base, lat_q, rec_q, log)
        rows.append(row)
        gc.collect()
        rows += bench_ivf(size, base, lat_q, rec_q, truth, args.nprobe, log, sq8=not args.no_sq8)
        if not args.no_hnsw:
            hnsw_rows, per_vector_s = bench_hnsw(size, base, lat_q, rec_q, truth, args.ef_search, log, per_vector_s)
            rows += hnsw_rows
        if size == max(args.sizes):
            stats = data_stats(base, rec_q, truth, rng)
        log(f"  RSS after {size:,}: {rss_mb():,.0f} MB")
    log()
    log("## Exact-search threshold")
    log()
    bench_threshold(sorted(args.threshold_sizes), data, lat_q, log)
    log()
    log(f"Data: {stats}.")
    log(f"Peak RSS {peak_rss_mb():,.0f} MB; total {time.perf_counter() - started:.0f} s; "
        f"load average at end {os.getloadavg()[0]:.1f}.")

    report = [line for line in out if not line.startswith("  ")]  # progress notes stay on screen only
    notes = [line.strip() for line in out if line.startswith("  ")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report + ["", "Notes:", ""] + [f"- {n}" for n in notes]) + "\n", encoding="utf-8")
    print(f"\nwritten to {args.out}")
    body = "\n".join(line for line in report if not line.startswith("# "))
    write_section("search_scale", "Vector search at 100k and 1M chunks", "python -m bench.search_scale", body)


if __name__ == "__main__":
    main()
