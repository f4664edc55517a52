"""The ``ingest`` command: build, inspect and search knowledge bases.

Exit codes: 0 success, 1 some files failed (the rest were ingested) or the
knowledge base is busy, 2 usage errors (bad names, unknown knowledge base,
mismatched embedder, bad options).
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import Progress as RichProgress
from rich.table import Table
from rich.text import Text

from cli.errors import err, user_errors
from cli.progress import progress_bars
from memory.embedding import EmbeddingModelNotFound, load_embedder
from memory.ingestion import IngestReport, Progress
from memory.knowledge_base import KnowledgeBaseBusy, KnowledgeBaseError, KnowledgeBaseUnavailable, validate_name
from memory.service import KnowledgeBaseService
from models.torch_device import run_and_exit
from rag.retrieval import Retriever
from settings import Settings

app = typer.Typer(
    help="Build and search zhiku knowledge bases (知库): PDFs, Word, Excel, slides, web pages, e-books, CSV, JSON, text, Markdown and images (OCR) in; local files (SQLite + FAISS + BM25) or Milvus out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# pdfminer logs every repaired stream; the per-file outcome is what users need.
logging.getLogger("pdfminer").setLevel(logging.ERROR)

KbOption = Annotated[Optional[str], typer.Option("--kb", help="Knowledge-base name (default: ZHIKU_DEFAULT_KB or 'default').")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


# A busy knowledge base is worth a retry (1); the rest are usage errors (2).
KNOWN_ERRORS = {(KnowledgeBaseBusy, KnowledgeBaseUnavailable): 1, (KnowledgeBaseError, EmbeddingModelNotFound): 2}


class Backend(str, Enum):
    local = "local"
    milvus = "milvus"


def load_settings(**overrides) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def explicit(settings: Settings, field: str):
    """The value of ``field`` if the user set it (flag, environment or config file), else None."""
    return getattr(settings, field) if field in settings.model_fields_set else None


def service_and_name(kb: str | None, **overrides) -> tuple[KnowledgeBaseService, str]:
    """The knowledge-base service for these settings, and the ``--kb`` name (the configured default if not given)."""
    settings = load_settings(**overrides)
    return KnowledgeBaseService.from_settings(settings), validate_name(settings.default_kb if kb is None else kb)


class BarProgress(Progress):
    """Rich progress bars on stderr: files parsed, chunks embedded, and pages read by OCR once there are any."""

    def __init__(self, bars: RichProgress):
        self.bars = bars
        self.files = bars.add_task("parsing", total=None)
        self.chunks = bars.add_task("embedding", total=0)
        self.ocr = None

    def files_found(self, count: int) -> None:
        self.bars.update(self.files, total=count)

    def file_done(self, path: str) -> None:
        self.bars.update(self.files, advance=1, description=f"parsing {Path(path).name[:40]}")

    def chunks_queued(self, count: int) -> None:
        task = self.bars.tasks[self.chunks]
        self.bars.update(self.chunks, total=(task.total or 0) + count)

    def chunks_embedded(self, count: int) -> None:
        self.bars.update(self.chunks, advance=count)

    def ocr_page(self, path: str, done: int, total: int) -> None:
        if self.ocr is None:
            self.ocr = self.bars.add_task("OCR", total=None)
        self.bars.update(self.ocr, advance=1, description=f"OCR {Path(path).name[:32]} page {done}/{total}")


@app.command()
def add(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (recursively) to ingest.", exists=True)],
    kb: KbOption = None,
    chunk_size: Annotated[Optional[int], typer.Option(help="Maximum characters per chunk (new knowledge bases).")] = None,
    chunk_overlap: Annotated[Optional[int], typer.Option(help="Characters shared by consecutive chunks.")] = None,
    embedding_model: Annotated[Optional[str], typer.Option(help="Sentence-transformers model path or cached id.")] = None,
    prune: Annotated[bool, typer.Option(help="Remove documents under PATHS whose files are gone.")] = False,
    backend: Annotated[
        Optional[Backend],
        typer.Option(help="Where a NEW knowledge base is stored (default: ZHIKU_VECTOR_STORE, else local); an existing one keeps its own."),
    ] = None,
    ocr: Annotated[
        Optional[bool], typer.Option("--ocr/--no-ocr", help="Read images and scanned PDF pages by OCR (default: ZHIKU_OCR, else on).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Ingest files into a knowledge base; unchanged files are skipped, changed ones replaced."""
    with user_errors(KNOWN_ERRORS):
        service, name = service_and_name(
            kb, chunk_size=chunk_size, chunk_overlap=chunk_overlap, embedding_model=embedding_model,
            vector_store=backend.value if backend else None, ocr=ocr,
        )  # fmt: skip
        settings = service.settings
        embedder = service.embedder_for(name, explicit(settings, "embedding_model"))
        with progress_bars() as bars:
            report = service.add(
                name, paths, embedder, chunk_size=explicit(settings, "chunk_size"),
                chunk_overlap=explicit(settings, "chunk_overlap"), prune=prune, progress=BarProgress(bars),
                backend=backend.value if backend else None,
            )  # fmt: skip
    print_report(report, name, as_json)
    raise typer.Exit(report.exit_code)


def print_report(report: IngestReport, name: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps([o.__dict__ for o in report.outcomes], ensure_ascii=False, indent=2))
        return
    err.print(
        Text(name, style="bold")
        + Text(
            f": {report.count('ingested')} ingested, {report.count('unchanged')} unchanged, "
            f"{report.count('skipped')} skipped, {report.count('removed')} removed, {len(report.failed)} failed"
        )
    )
    for outcome in report.failed:
        err.print(Text("  failed ", style="red") + Text(f"{outcome.path}: {outcome.error}"))
    for outcome in report.outcomes:
        if outcome.outcome == "skipped":
            err.print(Text("  skipped ", style="yellow") + Text(f"{outcome.path}: {outcome.error}"))


@app.command("list")
def list_(kb: KbOption = None, as_json: JsonOption = False) -> None:
    """List knowledge bases, or the documents of one (--kb) with status, chunk count and error."""
    with user_errors(KNOWN_ERRORS):
        service = KnowledgeBaseService.from_settings(load_settings())
        if kb is None:  # the same summary as GET /v1/knowledge_bases
            rows = [service.summary(name) for name in service.names()]
            columns = ["name", "documents", "chunks", "embedding_model", "chunk_size", "chunk_overlap"]
        else:
            rows = [
                {"path": d.path, "status": d.status, "chunks": d.chunk_count, "size": d.size, "error": d.error,
                 "ocr_pages": len(d.ocr_pages)}
                for d in service.documents(kb)
            ]  # fmt: skip
            columns = ["path", "status", "chunks", "size", "ocr_pages", "error"]
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    table = Table(*columns) if rows else Table("nothing here yet")
    for row in rows:
        table.add_row(*("" if row[c] is None else str(row[c]) for c in columns))
    Console().print(table)


@app.command()
def remove(
    paths: Annotated[list[Path], typer.Argument(help="Files, or folders whose documents to remove.")],
    kb: Annotated[str, typer.Option("--kb", help="Knowledge-base name.")],
    as_json: JsonOption = False,
) -> None:
    """Remove documents from a knowledge base (the files themselves are not touched)."""
    with user_errors(KNOWN_ERRORS):
        service, name = service_and_name(kb)
        removed = service.remove(name, paths)
    if as_json:
        print(json.dumps([o.path for o in removed], ensure_ascii=False))
    else:
        err.print(f"{len(removed)} documents removed from {kb}")


@app.command()
def drop(
    kb: Annotated[str, typer.Option("--kb", help="Knowledge-base name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a knowledge base and everything in it."""
    with user_errors(KNOWN_ERRORS):
        service, name = service_and_name(kb)
        service.manifest(name)
        if not yes and sys.stdin.isatty() and not typer.confirm(f"Delete knowledge base {kb!r}?"):
            raise typer.Exit(1)
        service.drop(name)
    err.print(f"dropped {kb}")


@app.command("rebuild")
def rebuild_(
    kb: Annotated[str, typer.Option("--kb", help="Knowledge-base name.")],
    embedding_model: Annotated[Optional[str], typer.Option(help="Re-embed with this model (default: the configured one).")] = None,
) -> None:
    """Re-embed every chunk of a knowledge base, e.g. after changing the embedding model."""
    with user_errors(KNOWN_ERRORS):
        service, name = service_and_name(kb, embedding_model=embedding_model)
        service.manifest(name)
        embedder = load_embedder(service.settings)
        with progress_bars() as bars:
            manifest = service.rebuild(name, embedder, BarProgress(bars))
    err.print(f"rebuilt {kb} with {manifest.embedding_model} (dimension {manifest.dimension})")


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="The question or keywords.")],
    kb: KbOption = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="How many passages.")] = None,
    step: Annotated[Optional[int], typer.Option(help="Neighbouring chunks joined on each side of a hit.")] = None,
    score_threshold: Annotated[Optional[float], typer.Option(help="Drop hits whose cosine is below this (0: off).")] = None,
    dense_only: Annotated[bool, typer.Option("--dense-only", help="Raw vector hits: no BM25, threshold or merging.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Search a knowledge base exactly as chat does: hybrid recall, fusion, threshold, merged passages.

    ``score`` is the best cosine similarity of a passage's hits (higher is closer, 1.0 is identical);
    ``rank_score`` is what ordered the passages.
    """
    with user_errors(KNOWN_ERRORS):
        service, name = service_and_name(kb, top_k=top_k, step=step, score_threshold=score_threshold)
        settings = service.settings
        service.manifest(name)
        embedder = service.embedder_for(name, explicit(settings, "embedding_model"))
        retriever = Retriever.from_settings(settings, service.knowledge_bases, embedder)
        try:
            passages = retriever.dense_hits(name, query) if dense_only else retriever.retrieve(name, query)
        finally:
            retriever.close()
    if as_json:
        print(json.dumps([p.to_dict() for p in passages], ensure_ascii=False, indent=2))
        return
    console = Console()
    for rank, passage in enumerate(passages, 1):
        where = Path(passage.source).name + (f" p.{passage.page}" if passage.page else "")
        console.print(Text(f"{rank}. {where}", style="bold") + Text(f"  score {passage.score:.3f}"))
        console.print(passage.text.strip(), markup=False, highlight=False)
        console.print()
    if not passages:
        err.print("no passage reached the score threshold" if settings.score_threshold and not dense_only else "nothing found")


def main() -> None:
    """The console script: the app, without interpreter teardown once torch is loaded."""
    run_and_exit(app)


if __name__ == "__main__":  # python -m cli.ingest
    main()
