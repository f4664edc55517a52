"""Hybrid retrieval (BM25 + dense, weighted reciprocal rank fusion) against each retriever alone.

    python -m bench.hybrid_retrieval [--questions 500] [--pool 10000] [--skip-dev]

Two measurements, both with the configured embedder:

1. **InsuranceQA**, Chinese and English separately: questions against a pool
   of answers (every gold answer of the chosen questions plus a seeded random
   fill). MRR@10 of dense only, BM25 only, equal-weight RRF and weighted RRF.
   The fusion weights are chosen on *train* questions and reported on
   *validation* questions (the test split is not touched). Jieba's search mode
   and plain mode are both measured for Chinese BM25.
2. **../shared/eval/dev.jsonl** over ../shared/corpus (zh + pdfs) at the
   configured chunking: hit@k (every evidence string inside the top k
   passages) for k in 3, 5, 8, dense only vs hybrid (``rag.retrieval.Retriever``).

Embeddings of the InsuranceQA pool are cached under ``--cache`` (they take
minutes on a small CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import insuranceqa
from bench.report import markdown_table, write_section

SHARED = Path(__file__).resolve().parents[2] / "shared"
STEPS = (0, 1, 2)
RECALL_K = 30
LEXICAL_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
RRF_KS = (10, 30, 60)
LINEAR_WEIGHTS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


@dataclass
class QASet:
    """Questions and the pool positions of their gold answers."""

    questions: list[str]
    gold: list[set[int]]


def insuranceqa_task(lang: str, questions: int, pool: int) -> tuple[list[str], QASet, QASet]:
    """(answer pool texts, train set, validation set) for one language; seeded."""
    answers = insuranceqa.load("answers")

    def sample(split: str, seed: int) -> list[dict]:
        rows = [q for _, q in sorted(insuranceqa.load(split).items(), key=lambda kv: int(kv[0])) if q.get("answers")]
        return random.Random(seed).sample(rows, questions)

    train, valid = sample("train", 2), sample("valid", 0)
    gold_ids = sorted({a for q in train + valid for a in q["answers"]}, key=int)
    others = sorted(set(answers) - set(gold_ids), key=int)
    pool_ids = gold_ids + random.Random(1).sample(others, max(0, pool - len(gold_ids)))
    position = {a: i for i, a in enumerate(pool_ids)}
    texts = [answers[a][lang].strip() for a in pool_ids]

    def qa(rows: list[dict]) -> QASet:
        return QASet([q[lang] for q in rows], [{position[a] for a in q["answers"]} for q in rows])

    return texts, qa(train), qa(valid)


def cached_passage_vectors(embedder, texts: list[str], cache: Path) -> np.ndarray:
    key = hashlib.sha256((embedder.model_id + "\n" + "\n".join(texts)).encode()).hexdigest()[:16]
    path = cache / f"pool-{key}.npy"
    if path.exists():
        return np.load(path)
    vectors = embedder.embed_passages(texts)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


Ranking = list[tuple[int, float]]  # (pool position, score), best first


def dense_rankings(query_vectors: np.ndarray, pool_vectors: np.ndarray, k: int) -> list[Ranking]:
    scores = query_vectors @ pool_vectors.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, axis=1)
    return [[(int(i), float(scores[q, i])) for i in row] for q, row in enumerate(top)]


def lexical_rankings(texts: list[str], questions: list[str], k: int, search_mode: bool) -> list[Ranking]:
    from memory.lexical_index import LexicalIndex, tokenize

    index = LexicalIndex.build(np.arange(len(texts)), [tokenize(t, search_mode=search_mode) for t in texts])
    return [index.search(tokenize(q, search_mode=search_mode), k) for q in questions]


def mrr_at_10(rankings: list[Ranking], gold: list[set[int]]) -> float:
    total = 0.0
    for ranking, wanted in zip(rankings, gold):
        rank = next((r for r, (i, _) in enumerate(ranking[:10], 1) if i in wanted), None)
        total += 1.0 / rank if rank else 0.0
    return total / len(gold)


def fused(runs: "LanguageRuns", split: str, weights) -> list[Ranking]:
    """What rag.retrieval does with the two recalled lists of each question."""
    from rag.retrieval import fuse_rankings, fuse_scores

    out = []
    for q, (dense, lexical) in enumerate(zip(runs.dense[split], runs.lexical[split])):
        if weights.method == "linear":
            cosines = dict(dense)
            extra = [i for i, _ in lexical if i not in cosines]
            cosines.update(zip(extra, (runs.pool_vectors[extra] @ runs.query_vectors[split][q]).tolist()))
            out.append(fuse_scores(cosines, lexical, weights))
        else:
            out.append(fuse_rankings([i for i, _ in dense], [i for i, _ in lexical], weights))
    return out


@dataclass
class LanguageRuns:
    """Dense and BM25 rankings of one language's train and validation questions."""

    lang: str
    dense: dict[str, list[Ranking]]
    lexical: dict[str, list[Ranking]]
    lexical_plain: dict[str, list[Ranking]]
    sets: dict[str, QASet]
    pool_vectors: np.ndarray
    query_vectors: dict[str, np.ndarray]


def language_runs(lang: str, embedder, args) -> LanguageRuns:
    texts, train, valid = insuranceqa_task(lang, args.questions, args.pool)
    started = time.perf_counter()
    pool_vectors = cached_passage_vectors(embedder, texts, args.cache)
    print(f"{lang}: pool of {len(texts)} embedded/loaded in {time.perf_counter() - started:.0f} s", flush=True)
    sets = {"train": train, "valid": valid}
    dense, lexical, plain, query_vectors = {}, {}, {}, {}
    for split, qa in sets.items():
        query_vectors[split] = embedder.embed_queries(qa.questions)
        dense[split] = dense_rankings(query_vectors[split], pool_vectors, RECALL_K)
        lexical[split] = lexical_rankings(texts, qa.questions, RECALL_K, search_mode=True)
        plain[split] = lexical_rankings(texts, qa.questions, RECALL_K, search_mode=False) if lang == "zh" else lexical[split]
    return LanguageRuns(lang, dense, lexical, plain, sets, pool_vectors, query_vectors)


def weight_grid():
    from rag.retrieval import FusionWeights

    rrf = [FusionWeights(1.0, w, k, "rrf") for w, k in itertools.product(LEXICAL_WEIGHTS, RRF_KS)]
    return rrf + [FusionWeights(1.0, w, 0, "linear") for w in LINEAR_WEIGHTS]


def tune(runs: list[LanguageRuns], grid) -> tuple:
    """The weights with the best mean train MRR@10 over the languages, and every grid point's scores."""
    best, best_score, table = None, -1.0, []
    for weights in grid:
        per_lang = [mrr_at_10(fused(r, "train", weights), r.sets["train"].gold) for r in runs]
        score = float(np.mean(per_lang))
        table.append((weights, per_lang))
        if score > best_score + 1e-9:
            best, best_score = weights, score
    return best, table


def insuranceqa_rows(runs: list[LanguageRuns], tuned_rrf, tuned) -> list[dict]:
    from rag.retrieval import FusionWeights

    rows = []
    for r in runs:
        for split in ("train", "valid"):
            gold = r.sets[split].gold
            dense = mrr_at_10(r.dense[split], gold)
            lexical = mrr_at_10(r.lexical[split], gold)
            weighted = mrr_at_10(fused(r, split, tuned), gold)
            rows.append(
                {
                    "language": r.lang,
                    "split": split,
                    "dense": f"{dense:.3f}",
                    "BM25 (jieba search mode)": f"{lexical:.3f}",
                    "BM25 (jieba plain)": f"{mrr_at_10(r.lexical_plain[split], gold):.3f}" if r.lang == "zh" else "–",
                    "RRF equal weights (k=60)": f"{mrr_at_10(fused(r, split, FusionWeights(1.0, 1.0, 60, 'rrf')), gold):.3f}",
                    "weighted RRF (tuned)": f"{mrr_at_10(fused(r, split, tuned_rrf), gold):.3f}",
                    "chosen fusion": f"{weighted:.3f}",
                    "chosen / max(dense, BM25)": f"{weighted / max(dense, lexical):.3f}",
                }
            )
    return rows


# ---- dev.jsonl over the shared corpus ------------------------------------------
def dev_rows(embedder, settings, tuned, home: Path) -> tuple[list[dict], dict[str, list[str]]]:
    from memory.evaluation import hit_rate, load_questions
    from memory.ingestion import add_paths
    from memory.knowledge_base import KnowledgeBases
    from rag.retrieval import Retriever
    from rag.retrieval import FusionWeights, Retriever

    kbs = KnowledgeBases(home)
    add_paths(kbs, "dev", [SHARED / "corpus" / "zh", SHARED / "corpus" / "pdfs"], embedder,
              chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap)
    kb = kbs.open("dev")
    questions = load_questions(SHARED / "eval" / "dev.jsonl")
    hybrid = Retriever(kbs, embedder, recall_k=RECALL_K, weights=tuned)
    dense_merged = Retriever(kbs, embedder, recall_k=RECALL_K, weights=FusionWeights(1.0, 0.0, tuned.rrf_k, tuned.method))
    rows, misses = [], {}
    try:
        for step in STEPS:
            for k in (3, 5, 8):
                dense, _ = hit_rate(questions, lambda q: [r.text for r in Retriever(None, embedder).dense_hits(kb, q, top_k=k, step=step)])
                merged, _ = hit_rate(questions, lambda q: [p.text for p in dense_merged.retrieve(kb, q, top_k=k, step=step)])
                mixed, missed = hit_rate(questions, lambda q: [p.text for p in hybrid.retrieve(kb, q, top_k=k, step=step)])
                misses[f"step {step} hybrid@{k}"] = missed
                context = np.mean([sum(len(p.text) for p in hybrid.retrieve(kb, q.question, top_k=k, step=step)) for q in questions])
                rows.append({"step": step, "k": k, "dense (ingest search --dense-only)": f"{dense:.3f}", "dense, hits merged": f"{merged:.3f}",
                             "hybrid": f"{mixed:.3f}", "hybrid − dense": f"{mixed - dense:+.3f}",
                             "hybrid context chars": f"{context:.0f}"})
                print(rows[-1], flush=True)
    finally:
        kb.close()
    return rows, misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--pool", type=int, default=10_000)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "zhiku-bench-cache")
    parser.add_argument("--skip-dev", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()

    from memory.embedding import load_embedder
    from settings import Settings

    settings = Settings()
    embedder = load_embedder(settings)
    runs = [language_runs(lang, embedder, args) for lang in ("zh", "en")]
    grid = weight_grid()
    tuned_rrf, _ = tune(runs, [w for w in grid if w.method == "rrf"])
    tuned, table = tune(runs, grid)
    print(f"tuned on train: {tuned} (best RRF: {tuned_rrf})", flush=True)
    for weights, per_lang in table:
        print(f"  {weights}: " + " ".join(f"{r.lang}={s:.3f}" for r, s in zip(runs, per_lang)))
    qa_rows = insuranceqa_rows(runs, tuned_rrf, tuned)
    print(markdown_table(qa_rows), flush=True)

    dev_table, misses = "", {}
    if not args.skip_dev and SHARED.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            rows, misses = dev_rows(embedder, settings, tuned, Path(tmp))
        dev_table = markdown_table(rows)
        print(dev_table)
    body = render(settings, args, tuned_rrf, tuned, qa_rows, dev_table, misses)
    if not args.no_write:
        write_section("hybrid_retrieval", "Hybrid retrieval: BM25 + dense, weighted reciprocal rank fusion",
                      "python -m bench.hybrid_retrieval", body)
    print(body)


def render(settings, args, tuned_rrf, tuned, qa_rows, dev_table, misses) -> str:
    valid = {r["language"]: r for r in qa_rows if r["split"] == "valid"}  # "fused" below is the chosen fusion
    met = all(float(r["chosen / max(dense, BM25)"]) >= 1.0 for r in valid.values())
    parts = [
        f"Embedding model {settings.embedding_model}; each retriever recalls {RECALL_K}; dense weight 1. "
        "RRF: Σ weight / (rrf_k + rank). Linear: cosine min-max-normalised over the candidates + "
        "weight × BM25 / best BM25 (rag.retrieval.fuse_scores).",
        f"**InsuranceQA** ({args.questions} train + {args.questions} validation questions per language, pool of "
        f"{args.pool} answers: every gold answer plus a seeded random fill). Weights chosen on train by mean MRR@10 "
        f"over both languages; RRF grid lexical weight ∈ {list(LEXICAL_WEIGHTS)} × rrf_k ∈ {list(RRF_KS)} "
        f"(best: weight {tuned_rrf.lexical}, rrf_k {tuned_rrf.rrf_k}); linear grid weight ∈ {list(LINEAR_WEIGHTS)}. "
        f"**Chosen: {tuned.method}, lexical weight {tuned.lexical}"
        + (f", rrf_k {tuned.rrf_k}" if tuned.method == "rrf" else "") + "**. MRR@10:",
        markdown_table(qa_rows),
        f"Target fused ≥ max(dense, BM25) on validation in both languages: **{'met' if met else 'not met'}**.",
    ]
    if dev_table:
        parts += [
            f"**dev.jsonl** (answerable questions) over ../shared/corpus (zh + pdfs), chunk_size {settings.chunk_size}, "
            f"overlap {settings.chunk_overlap}, neighbour steps {list(STEPS)} (char budget {settings.neighbour_char_budget}). hit@k: every evidence string inside the top k passages. "
            "\"hits merged\": the same dense ranking through rag.retrieval (adjacent hits of one document joined "
            "into one passage; recalled hits ranked below the k-th passage still join a passage they touch).",
            dev_table,
            "Hybrid misses at k=5: " + "; ".join(f"{k}: {' '.join(v) or 'none'}" for k, v in misses.items() if k.endswith("@5")),
        ]
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
