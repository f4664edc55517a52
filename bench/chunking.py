"""Choose chunk_size / chunk_overlap by measuring dense hit@5 on ../shared/eval/dev.jsonl.

    python -m bench.chunking [--sizes 200 300 400 600 800] [--overlap-ratio 0.2]

Every setting ingests the shared corpus into a fresh knowledge base with the
configured embedder (vectors of identical chunk texts are not reused across
settings: each knowledge base is separate) and scores hit@5 and hit@3. Larger
chunks put more text into the same five passages, so the report also gives the
characters of context those passages cost — the generator pays for them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.report import markdown_table, write_section

SHARED = Path(__file__).resolve().parents[2] / "shared"


def evaluate(size: int, overlap: int, embedder, home: Path) -> dict:
    from memory.evaluation import hit_rate, load_questions
    from memory.ingestion import add_paths
    from memory.knowledge_base import KnowledgeBases
    from rag.retrieval import Retriever

    kbs = KnowledgeBases(home / f"kb-{size}-{overlap}")
    started = time.perf_counter()
    add_paths(kbs, "dev", [SHARED / "corpus" / "zh", SHARED / "corpus" / "pdfs"], embedder, chunk_size=size, chunk_overlap=overlap)
    seconds = time.perf_counter() - started
    kb = kbs.open("dev")
    try:
        questions = load_questions(SHARED / "eval" / "dev.jsonl")
        context_chars: list[int] = []

        def top(k: int):
            def retrieve(question: str) -> list[str]:
                texts = [r.text for r in Retriever(None, embedder).dense_hits(kb, question, top_k=k)]
                context_chars.append(sum(map(len, texts)))
                return texts

            return retrieve

        hit5, misses = hit_rate(questions, top(5))
        mean_context = statistics.mean(context_chars)
        hit3, _ = hit_rate(questions, top(3))
        return {
            "chunk_size": size,
            "chunk_overlap": overlap,
            "chunks": kb.store.chunk_count(),
            "ingest s": f"{seconds:.0f}",
            "hit@3": f"{hit3:.3f}",
            "hit@5": f"{hit5:.3f}",
            "context chars @5": f"{mean_context:.0f}",
            "misses @5": " ".join(misses),
        }
    finally:
        kb.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 300, 400, 600, 800])
    parser.add_argument("--overlap-ratio", type=float, default=0.2)
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit("bench.chunking needs ../shared (the evaluation corpus)")

    from memory.embedding import load_embedder
    from settings import Settings

    settings = Settings()
    embedder = load_embedder(settings)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            rows.append(evaluate(size, int(size * args.overlap_ratio), embedder, Path(tmp)))
            print(rows[-1], flush=True)
    body = (
        f"Dense retrieval only, embedding model {settings.embedding_model}; corpus ../shared/corpus (zh + pdfs), "
        f"questions ../shared/eval/dev.jsonl (answerable ones). A hit needs every evidence string inside the top-k passages.\n\n"
        + markdown_table(rows)
        + f"\n\nDefault in settings: chunk_size={settings.chunk_size}, chunk_overlap={settings.chunk_overlap}. "
        "600/120 was chosen from this table: the best hit@3, hit@5 within one question of 800/160, "
        "at three quarters of 800's context cost (the generator pays for every character)."
    )
    print(body)
    write_section("chunking", "Chunking: chunk_size / chunk_overlap against hit@k", "python -m bench.chunking", body)


if __name__ == "__main__":
    main()
