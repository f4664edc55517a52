"""PDF tables as rows with headers (``Settings.pdf_tables``) against plain page text: retrieval and cost.

    python -m bench.pdf_tables [--no-write]

Builds the shared corpus (``../shared/corpus/zh`` and ``pdfs``) twice, with the table
finder off and on, and reports ../shared/eval/dev.jsonl hit@5 (hybrid, step 1, as chat
retrieves) for each, the questions each one misses, how many tables were found per
PDF, and the PDF parsing time with and without the finder. Results go to
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.report import markdown_table, write_section

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CORPUS = [SHARED / "corpus" / "zh", SHARED / "corpus" / "pdfs"]


def hit_at_5(settings, embedder, home: Path, pdf_tables: bool) -> tuple[float, list[str]]:
    from ingest.documents import ReadOptions
    from memory.evaluation import hit_rate, load_questions
    from memory.ingestion import add_paths
    from memory.knowledge_base import KnowledgeBases
    from rag.retrieval import Retriever

    kbs = KnowledgeBases(home)
    add_paths(kbs, "dev", CORPUS, embedder, chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap,
              read_options=ReadOptions(pdf_tables=pdf_tables))  # fmt: skip
    retriever = Retriever.from_settings(settings, kbs, embedder)
    try:
        questions = load_questions(SHARED / "eval" / "dev.jsonl")
        return hit_rate(questions, lambda q: [p.text for p in retriever.retrieve("dev", q, top_k=5, step=1)])
    finally:
        retriever.close()


def table_counts() -> list[dict]:
    """Tables found and parse seconds per PDF of the corpus, finder off and on."""
    import pdfplumber

    from ingest.pdf import _tables, page_text

    rows = []
    for path in sorted((SHARED / "corpus" / "pdfs").glob("*.pdf")):
        try:
            seconds = {}
            found = 0
            for tables in (False, True):
                started = time.perf_counter()
                with pdfplumber.open(path) as pdf:
                    pages = len(pdf.pages)
                    for page in pdf.pages:
                        page_text(page, tables)
                        if tables:
                            found += len(_tables(page))
                seconds[tables] = time.perf_counter() - started
        except Exception:  # noqa: BLE001 - the corpus holds deliberately broken PDFs
            continue
        rows.append({"PDF": path.name, "pages": pages, "tables found": found,
                     "parse s, plain": f"{seconds[False]:.2f}", "parse s, with tables": f"{seconds[True]:.2f}"})  # fmt: skip
    return rows


def main() -> None:
    from memory.embedding import load_embedder
    from settings import Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/BENCHMARKS.md alone.")
    args = parser.parse_args()
    settings = Settings()
    embedder = load_embedder(settings)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for tables in (False, True):
            results[tables] = hit_at_5(settings, embedder, Path(root) / f"tables-{tables}", tables)
            print(tables, results[tables], flush=True)
    retrieval = [
        {"PDF text": label, "dev.jsonl hit@5 (hybrid, step 1)": f"{results[t][0]:.3f}", "missed": ", ".join(results[t][1]) or "none"}
        for t, label in ((False, "plain page text (before)"), (True, "tables as rows with headers (after)"))
    ]
    counts = table_counts()
    body = "\n\n".join([markdown_table(retrieval), markdown_table(counts)])
    print(body)
    if not args.no_write:
        write_section("pdf-tables", "PDF tables: rows with headers vs plain text", "python -m bench.pdf_tables", body)


if __name__ == "__main__":
    main()
