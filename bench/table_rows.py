"""How a table row retrieves: ``header: value`` lines (what zhiku emits) against Markdown rows.

    python -m bench.table_rows [--rows 80] [--no-write]

One table of GPU models (型号, 显存, 单价（元）, 功耗（W）, 上市年份) is written into a
Markdown file twice: as zhiku renders tables (``ingest.tables.table_block``: every row
carries its headers) and as a Markdown table (the header once, on top). Each is
ingested into its own knowledge base with the default settings, and every row is asked
about two of its cells ("A123 的单价（元）是多少？") and looked up by its price, which is
unique ("单价（元）为 23731 的是哪个型号？"); a question is a hit when one of the top 5
passages (hybrid retrieval, as chat does) holds the model and the value.
Results go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from bench.report import markdown_table, write_section

HEADER = ["型号", "显存", "单价（元）", "功耗（W）", "上市年份"]
ASKED = [2, 3]  # the columns questions ask about


def table(rows: int, seed: int = 12) -> list[list[str]]:
    rng = random.Random(seed)
    return [HEADER] + [
        [f"{rng.choice('ABHLMT')}{100 + i}", f"{rng.choice([16, 24, 32, 48, 80])}GB", str(20_000 + 3_700 * i + rng.randrange(100)),
         str(rng.randrange(15, 70) * 10), str(rng.randrange(2016, 2027))]
        for i in range(rows)
    ]  # fmt: skip


def markdown_rows(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def hit_rate(settings, embedder, home: Path, name: str, text: str, rows: list[list[str]]) -> dict[str, float]:
    from memory.ingestion import add_paths
    from memory.knowledge_base import KnowledgeBases
    from rag.retrieval import Retriever

    folder = home / f"{name}-docs"
    folder.mkdir(parents=True)
    (folder / "显卡报价.md").write_text(f"# 显卡报价\n\n{text}\n", encoding="utf-8")
    kbs = KnowledgeBases(home / "kb")
    add_paths(kbs, name, [folder], embedder, chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap)
    retriever = Retriever.from_settings(settings, kbs, embedder)
    hits = {"by model": [], "by price": []}
    try:
        for row in rows[1:]:
            for column in ASKED:
                passages = retriever.retrieve(name, f"{row[0]} 的{HEADER[column]}是多少？", top_k=5)
                hits["by model"].append(any(row[0] in p.text and row[column] in p.text for p in passages))
            passages = retriever.retrieve(name, f"{HEADER[2]}为 {row[2]} 的是哪个型号？", top_k=5)
            hits["by price"].append(any(row[0] in p.text and row[2] in p.text for p in passages))
    finally:
        retriever.close()
    return {kind: sum(found) / len(found) for kind, found in hits.items()}


def main() -> None:
    from ingest.tables import table_block
    from memory.embedding import load_embedder
    from settings import Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=80)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/BENCHMARKS.md alone.")
    args = parser.parse_args()
    settings = Settings()
    embedder = load_embedder(settings)
    rows = table(args.rows)
    renderings = {"header: value lines (zhiku)": table_block(rows), "Markdown table (header once)": markdown_rows(rows)}
    results = []
    with tempfile.TemporaryDirectory() as root:
        for i, (label, text) in enumerate(renderings.items()):
            rates = hit_rate(settings, embedder, Path(root) / str(i), f"rows-{i}", text, rows)
            results.append({
                "rendering": label,
                f"hit@5, a model's cell ({args.rows * len(ASKED)} questions)": f"{rates['by model']:.3f}",
                f"hit@5, the model of a price ({args.rows} questions)": f"{rates['by price']:.3f}",
            })  # fmt: skip
            print(results[-1], flush=True)
    body = (
        f"A table of {args.rows} GPU models, {len(HEADER)} columns, as one Markdown file; questions name a model and "
        "a column (\"A123 的单价（元）是多少？\") or a price (\"单价（元）为 23731 的是哪个型号？\"); a hit: a top-5 passage "
        "(hybrid, step 1) holds the model and the value.\n\n"
        + markdown_table(results)
    )
    print(body)
    if not args.no_write:
        write_section("table-rows", "Table rows: header: value lines vs Markdown rows", f"python -m bench.table_rows --rows {args.rows}", body)


if __name__ == "__main__":
    main()
