"""Speed and retrieval quality of the embedding backends: torch fp32 / bf16, ONNX fp32, ONNX int8.

    python -m bench.embedding_backends [--passages 300] [--questions 300] [--pool 3000]
                                       [--model bundled:multilingual-e5-small] [--docs]

Throughput: the same Chinese passages (~170 characters, cut from
../shared/corpus/zh, else from insuranceqa answers) embedded by each backend
after a warm-up; tokens/s counts real (unpadded) tokens, prompt included.

Quality: insuranceqa-data's validation questions (Chinese) against a pool of
answers that holds every question's gold answers plus random others; MRR@10
and recall@5 (share of a question's gold answers in its top 5), exact search.
Also the mean cosine of each backend's passage vectors to torch's.

Prints a markdown table and writes it to bench/out/embedding_backends.md
(``--docs`` also updates its section of docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

import numpy as np

from bench import insuranceqa
from bench.report import markdown_table, write_section

ROOT = Path(__file__).resolve().parents[1]
SHARED_ZH = ROOT.parent / "shared" / "corpus" / "zh"
OUT = ROOT / "bench" / "out" / "embedding_backends.md"
BACKENDS = ("torch", "torch-bf16", "onnx", "onnx-int8")
# A bench label -> (Embedder backend, torch dtype).
VARIANTS = {
    "torch": ("torch", "float32"),
    "torch-bf16": ("torch", "bfloat16"),
    "onnx": ("onnx", "float32"),
    "onnx-int8": ("onnx-int8", "float32"),
}


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("gb18030", errors="replace")


def throughput_passages(count: int, length: int = 170) -> list[str]:
    """``count`` distinct Chinese passages of ``length`` characters."""
    sources = sorted(p for p in SHARED_ZH.glob("*") if p.suffix in (".txt", ".md")) if SHARED_ZH.is_dir() else []
    texts = [re.sub(r"\s+", " ", _read_text(p)) for p in sources]
    if not texts:
        texts = [a["zh"].strip() for a in insuranceqa.load("answers").values()]
    pieces = [t[i : i + length] for t in texts for i in range(0, len(t) - length + 1, length)]
    pieces = list(dict.fromkeys(p for p in pieces if len(p.strip()) == length))
    if len(pieces) < count:
        raise SystemExit(f"only {len(pieces)} passages available, asked for {count}")
    return random.Random(0).sample(pieces, count)


def retrieval_task(questions: int, pool: int) -> tuple[list[str], list[set[int]], list[str]]:
    """(question texts, gold answer positions per question, answer pool)."""
    answers = insuranceqa.load("answers")
    valid = [q for _, q in sorted(insuranceqa.load("valid").items(), key=lambda kv: int(kv[0])) if q.get("answers")]
    chosen = random.Random(0).sample(valid, questions)
    gold_ids = sorted({a for q in chosen for a in q["answers"]}, key=int)
    others = sorted(set(answers) - set(gold_ids), key=int)
    pool_ids = gold_ids + random.Random(1).sample(others, max(0, pool - len(gold_ids)))
    position = {a: i for i, a in enumerate(pool_ids)}
    texts = [answers[a]["zh"].strip() for a in pool_ids]
    return [q["zh"] for q in chosen], [{position[a] for a in q["answers"]} for q in chosen], texts


def score(query_vecs: np.ndarray, pool_vecs: np.ndarray, gold: list[set[int]]) -> tuple[float, float]:
    """Mean MRR@10 and recall@5."""
    top = np.argsort(-(query_vecs @ pool_vecs.T), axis=1)[:, :10]
    mrr, recall = [], []
    for row, wanted in zip(top.tolist(), gold):
        rank = next((r for r, i in enumerate(row, 1) if i in wanted), None)
        mrr.append(1.0 / rank if rank else 0.0)
        recall.append(len(wanted & set(row[:5])) / len(wanted))
    return float(np.mean(mrr)), float(np.mean(recall))


def run_backend(backend: str, model: str, path: Path, onnx_dir: Path, args, data: dict) -> dict:
    from memory.embedding import Embedder

    started = time.perf_counter()
    kind, dtype = VARIANTS[backend]
    embedder = Embedder(
        model, path, backend=kind, device="cpu", dtype=dtype, batch_size=args.batch_size, onnx_dir=onnx_dir
    )
    load_s = time.perf_counter() - started
    embedder.embed_passages(data["passages"][:16])  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        vectors = embedder.embed_passages(data["passages"])
        best = min(best, time.perf_counter() - started)
    pool_vecs = embedder.embed_passages(data["pool"])
    mrr, recall = score(embedder.embed_queries(data["questions"]), pool_vecs, data["gold"])
    return {
        "backend": backend,
        "load_s": load_s,
        "passages_per_s": len(vectors) / best,
        "tokens_per_s": data["tokens"] / best,
        "mrr10": mrr,
        "recall5": recall,
        "vectors": vectors,
        "model_mb": _model_mb(backend, path, onnx_dir),
    }


def _model_mb(backend: str, path: Path, onnx_dir: Path) -> float:
    name = {"torch": None, "torch-bf16": None, "onnx": "model.onnx", "onnx-int8": "model_qint8.onnx"}[backend]
    file = path / "model.safetensors" if name is None else onnx_dir / name
    return file.stat().st_size / 2**20 if file.is_file() else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="embedding model (default: the configured one)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--passages", type=int, default=300)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--pool", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per backend; the best counts")
    parser.add_argument("--docs", action="store_true", help="also update docs/BENCHMARKS.md")
    args = parser.parse_args(argv)

    from memory.embedding import onnx_cache_dir, resolve_embedding_model
    from settings import Settings

    settings = Settings()
    model = args.model or settings.embedding_model
    path = resolve_embedding_model(model, settings)
    onnx_dir = onnx_cache_dir(model, path, settings)
    passages = throughput_passages(args.passages)
    questions, gold, pool = retrieval_task(args.questions, args.pool)
    data = {"passages": passages, "questions": questions, "gold": gold, "pool": pool}
    data["tokens"] = _tokens(model, path, passages)
    rows = []
    for backend in args.backends.split(","):
        print(f"{backend}: running", flush=True)
        rows.append(run_backend(backend, model, path, onnx_dir, args, data))
    reference = next((r["vectors"] for r in rows if r["backend"] == "torch"), None)
    table = markdown_table([_row(r, reference) for r in rows])
    body = (
        f"Model `{model}`; throughput on {len(passages)} Chinese passages of 170 characters "
        f"({data['tokens'] / len(passages):.0f} tokens each with prompt), batch {args.batch_size}, "
        f"best of {args.repeats}; retrieval: {len(questions)} insuranceqa validation questions (zh) "
        f"against {len(pool)} answers.\n\n{table}\n"
    )
    print(body)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(body, encoding="utf-8")
    if args.docs:
        write_section("embedding-backends", "Embedding backends", "python -m bench.embedding_backends", body)


def _tokens(model: str, path: Path, passages: list[str]) -> int:
    from transformers import AutoTokenizer

    from memory.embedding import model_prompts

    tok = AutoTokenizer.from_pretrained(str(path))
    prefix = model_prompts(path, model)[1]
    return sum(len(ids) for ids in tok([prefix + p for p in passages], truncation=True, max_length=512)["input_ids"])


def _row(r: dict, reference: np.ndarray | None) -> dict:
    agreement = "" if reference is None else f"{float((r['vectors'] * reference).sum(1).mean()):.4f}"
    return {
        "backend": r["backend"],
        "weights MB": f"{r['model_mb']:.0f}",
        "load s": f"{r['load_s']:.1f}",
        "passages/s": f"{r['passages_per_s']:.1f}",
        "tokens/s": f"{r['tokens_per_s']:.0f}",
        "MRR@10": f"{r['mrr10']:.4f}",
        "recall@5": f"{r['recall5']:.4f}",
        "cosine to torch": agreement,
    }


if __name__ == "__main__":
    main()
