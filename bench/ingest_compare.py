"""zhiku's ingest against a LangChain reference pipeline, on the same files and embedding model.

    python -m bench.ingest_compare [--insuranceqa 1500] [--full-insuranceqa]
    python -m bench.ingest_compare --formats-only     # only the per-format parsing throughput

Reference: pdfplumber/text loaders + RecursiveCharacterTextSplitter +
HuggingFaceEmbeddings + FAISS.from_documents + save_local, with the same
chunk size, overlap, model folder and passage prompt. Each run is a separate
process so peak RSS is its own (plus its child processes'); wall time is the whole process (start, imports,
model load, work) as a user measures a command; "work" is the same run from the
first loader call on (imports excluded). Results go to docs/BENCHMARKS.md.

A second table gives each file format's parsing throughput (load, clean, split,
tokenise: ``ingest.pipeline.prepare_files``, in this process, files made by
``tests.format_fixtures``), files/s and pages/s, so that a slow loader shows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import insuranceqa
from bench.report import markdown_table, write_section

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def insuranceqa_answers(lang: str) -> list[str]:
    answers = insuranceqa.load("answers")
    return [answers[key][lang].strip() for key in sorted(answers, key=int)]


def write_passages(folder: Path, passages: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for number, text in enumerate(passages):
        (folder / f"answer-{number:05d}.txt").write_text(text, encoding="utf-8")
    return folder


def peak_rss_mb() -> float:
    """This process's peak RSS plus the largest peak of its finished child processes (zhiku parses
    files in one): an upper bound on what the pipeline held at once."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


# ---- children: one pipeline run each, printing one JSON line -------------
def run_zhiku(files: list[Path], home: Path) -> dict:
    from memory.embedding import load_embedder
    from memory.ingestion import add_paths
    from memory.knowledge_base import KnowledgeBases
    from settings import Settings

    settings = Settings(home=home)
    started = time.perf_counter()
    embedder = load_embedder(settings)
    report = add_paths(
        KnowledgeBases.from_settings(settings),
        "bench",
        files,
        embedder,
        chunk_size=settings.chunk_size,
        chunk_overlap=settings.chunk_overlap,
    )
    return {
        "seconds": time.perf_counter() - started,
        "chunks": sum(o.chunks for o in report.outcomes if o.outcome in ("ingested", "unchanged")),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_langchain(files: list[Path], home: Path) -> dict:
    from langchain_community.document_loaders import PDFPlumberLoader, TextLoader
    from langchain_community.vectorstores import FAISS
    from langchain_huggingface import HuggingFaceEmbeddings
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    from memory.embedding import resolve_embedding_model
    from settings import Settings

    settings = Settings(home=home)
    started = time.perf_counter()
    model_path = resolve_embedding_model(settings.embedding_model, settings)
    documents = []
    for path in expand(files):
        loader = PDFPlumberLoader(str(path)) if path.suffix == ".pdf" else TextLoader(str(path), autodetect_encoding=True)
        try:
            documents += loader.load()
        except Exception:  # the reference has no per-file error reporting; skip what it cannot read
            continue
    splitter = RecursiveCharacterTextSplitter(chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap)
    chunks = splitter.split_documents(documents)
    embeddings = HuggingFaceEmbeddings(
        model_name=str(model_path),
        model_kwargs={"device": "cpu"},
        encode_kwargs={"normalize_embeddings": True, "prompt": "passage: ", "batch_size": settings.embedding_batch_size},
    )
    store = FAISS.from_documents(chunks, embeddings)
    store.save_local(str(home / "langchain-faiss"))
    return {"seconds": time.perf_counter() - started, "chunks": len(chunks), "peak_rss_mb": peak_rss_mb()}


def expand(paths: list[Path]) -> list[Path]:
    out = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.suffix in (".pdf", ".txt", ".md") and p.is_file())
        else:
            out.append(path)
    return out


CHILDREN = {"zhiku": run_zhiku, "langchain": run_langchain}


# ---- parsing throughput per format ------------------------------------------------
def format_makers() -> dict[str, tuple[str, object, int]]:
    """{format: (suffix, make(path), files)}: fixtures written by the libraries that read them."""
    from tests import format_fixtures as ff
    from tests.fixtures import PDF_PAGES, make_chinese_pdf
    from tests.test_ocr import SCAN_PAGES
    from tests.test_pdf_tables import make_table_pdf

    text = "知库把文档切成片段，检索时先召回相关片段，再交给语言模型生成答案。" * 40
    return {
        "txt": (".txt", lambda p: p.write_text(text, encoding="utf-8"), 40),
        "pdf (text, 4 pages)": (".pdf", lambda p: make_chinese_pdf(p, pages=PDF_PAGES), 20),
        "pdf (a table)": (".pdf", make_table_pdf, 20),
        "docx": (".docx", ff.make_docx, 40),
        "xlsx (2 sheets)": (".xlsx", ff.make_xlsx, 40),
        "xlsx (5,000 rows)": (".xlsx", lambda p: ff.make_xlsx(p, extra_rows=5000), 4),
        "pptx (2 slides)": (".pptx", ff.make_pptx, 40),
        "html": (".html", ff.make_html, 40),
        "epub": (".epub", ff.make_epub, 40),
        "csv": (".csv", ff.make_csv, 40),
        "json": (".json", ff.make_json, 40),
        "jsonl": (".jsonl", ff.make_jsonl, 40),
        "png (OCR)": (".png", ff.make_text_image, 3),
        "scanned pdf (OCR, 2 pages)": (".pdf", lambda p: ff.make_scanned_pdf(p, SCAN_PAGES), 3),
    }


def format_rows() -> list[dict]:
    from ingest.loaders import load
    from ingest.ocr import engine
    from ingest.pipeline import prepare_files
    from memory.lexical_index import token_text
    from settings import Settings

    settings = Settings()
    engine()  # the OCR engine and jieba's dictionary load once per parsing process: not per file
    token_text("预热 warm-up")
    rows = []
    for label, (suffix, make, count) in format_makers().items():
        with tempfile.TemporaryDirectory() as tmp:
            paths = [Path(tmp) / f"file-{i}{suffix}" for i in range(count)]
            for path in paths:
                make(path)
            pages = sum(len(load(path).pages) for path in paths)
            paths = [str(path) for path in paths]
            started = time.perf_counter()
            prepared = prepare_files(paths, settings.chunk_size, settings.chunk_overlap, token_text)
            seconds = time.perf_counter() - started
        failed = [p.reason for p in prepared if p.status != "ok"]
        if failed:
            raise RuntimeError(f"{label}: {failed[0]}")
        rows.append({
            "format": label, "files": count, "pages": pages, "chunks": sum(len(p.chunks) for p in prepared),
            "files/s": f"{count / seconds:.1f}", "pages/s": f"{pages / seconds:.1f}",
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def write_format_rows() -> None:
    body = (
        "Parsing only (load, clean, split, BM25 tokens; no embedding), one process, the files of each row "
        "written by `tests.format_fixtures`; pages are PDF pages, slides and image frames, 1 for the other "
        "formats. Files/s and pages/s of ingest are these or the embedding's rate (\"Ingest: zhiku vs LangChain "
        "reference\"), whichever is lower; the OCR rows are short pages of three lines (a dense page: \"OCR\").\n\n"
        + markdown_table(format_rows())
    )
    print(body)
    write_section("ingest_formats", "Ingest: parsing throughput per file format", "python -m bench.ingest_compare --formats-only", body)


def child(pipeline: str, home: Path, files: list[Path]) -> dict:
    """Run one pipeline in a fresh process; ``seconds`` is the whole process's wall time
    (interpreter start, imports, model load, work), as a user would measure it."""
    command = [sys.executable, "-m", "bench.ingest_compare", "--child", pipeline, "--home", str(home), *map(str, files)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{pipeline} run failed:\n{done.stderr[-3000:]}")
    reported = json.loads(done.stdout.strip().splitlines()[-1])
    return {**reported, "work_seconds": reported["seconds"], "seconds": seconds}


def compare(label: str, files: list[Path], repeat: int) -> list[dict]:
    """Each pipeline ``repeat`` times, interleaved; each row is its fastest run (the one least
    disturbed by the machine: two runs of the same command here differ by up to 10%)."""
    runs: dict[str, list[dict]] = {"first": [], "again": [], "reference": []}
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp)
            runs["first"].append(child("zhiku", home, files))
            runs["again"].append(child("zhiku", home, files))
            runs["reference"].append(child("langchain", home, files))
    first, again, reference = (min(runs[key], key=lambda r: r["seconds"]) for key in ("first", "again", "reference"))
    rows = [
        {"workload": label, "pipeline": "LangChain reference", **fmt(reference, runs["reference"]), "vs reference": "1.00×"},
        {"workload": label, "pipeline": "zhiku first ingest", **fmt(first, runs["first"]), "vs reference": f"{reference['seconds'] / first['seconds']:.2f}× faster"},
        {
            "workload": label,
            "pipeline": "zhiku unchanged re-ingest",
            **fmt(again, runs["again"]),
            "vs reference": f"{first['seconds'] / again['seconds']:.0f}× faster than zhiku's first ingest "
            f"(work alone: {first['work_seconds'] / again['work_seconds']:.0f}×)",
        },
    ]
    return rows


def fmt(result: dict, runs: list[dict]) -> dict:
    return {
        "wall s": f"{result['seconds']:.1f}",
        "all runs s": " / ".join(f"{r['seconds']:.1f}" for r in runs),
        "work s": f"{result['work_seconds']:.2f}",
        "chunks": result["chunks"],
        "peak RSS MB": f"{result['peak_rss_mb']:.0f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--insuranceqa", type=int, default=1500, help="InsuranceQA zh answers written as files.")
    parser.add_argument("--full-insuranceqa", action="store_true", help="Also ingest all 27k answers (zhiku only, RSS).")
    parser.add_argument("--repeat", type=int, default=2, help="Runs of each pipeline per workload (the fastest is reported).")
    parser.add_argument("--formats-only", action="store_true", help="Only the per-format parsing throughput table.")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.files, args.home)), flush=True)
        if args.child == "zhiku":  # it ends as the `ingest` command does
            from models.torch_device import run_and_exit

            run_and_exit(lambda: None)
        return

    if args.formats_only:
        write_format_rows()
        return
    from settings import Settings

    settings = Settings()
    os.environ["ZHIKU_MODELS_DIR"] = str(settings.model_cache)  # every run shares the prepared models
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if SHARED.is_dir():
            rows += compare("shared corpus/zh (5 docs, 2 PDFs)", [SHARED / "corpus" / "zh"], args.repeat)
        passages = insuranceqa_answers("zh")
        folder = write_passages(Path(tmp) / "iqa", passages[: args.insuranceqa])
        rows += compare(f"InsuranceQA zh, {args.insuranceqa} answer files", [folder], args.repeat)
        notes = ""
        if args.full_insuranceqa:
            full = write_passages(Path(tmp) / "iqa-full", passages)
            with tempfile.TemporaryDirectory() as home:
                result = child("zhiku", Path(home), [full])
                again = child("zhiku", Path(home), [full])
            notes = (
                f"\nAll {len(passages)} InsuranceQA zh answers as files, zhiku only: first ingest {result['seconds']:.0f} s, "
                f"{result['chunks']} chunks, peak RSS {result['peak_rss_mb']:.0f} MB (target ≤ 2048 MB); "
                f"unchanged re-ingest {again['seconds']:.1f} s ({result['seconds'] / again['seconds']:.0f}× faster; "
                f"work alone {again['work_seconds']:.2f} s, {result['work_seconds'] / again['work_seconds']:.0f}×).\n"
            )
    body = (
        f"chunk_size={settings.chunk_size}, chunk_overlap={settings.chunk_overlap}, "
        f"embedding model {settings.embedding_model} (backend {settings.embedding_backend}).\n\n"
        + markdown_table(rows)
        + "\n"
        + notes
        + "\nEach pipeline ran "
        + f"{args.repeat} times per workload, interleaved; a row is its fastest run (all runs listed). "
        "Peak RSS is each run's own peak plus the peak of its child processes (zhiku parses files in one), "
        "an upper bound on what it held at once. Wall time is the whole process, start to exit; zhiku's run ends "
        "as the `ingest` command does, without the 2 s interpreter teardown that torch's modules cost "
        "(models.torch_device.run_and_exit), the reference as a script does.\n"
    )
    print(body)
    write_section("ingest_compare", "Ingest: zhiku vs LangChain reference", "python -m bench.ingest_compare", body)
    write_format_rows()


if __name__ == "__main__":
    main()
