"""Read a file from disk into a :class:`~ingest.documents.LoadedDocument`: one loader per format, chosen by suffix.

    load(Path("手册.pdf"))   -> LoadedDocument(pages=[Page(1, ...), Page(2, ...), ...])
    load(Path("笔记.md"))    -> LoadedDocument(pages=[Page(None, ...)])
    load(Path("汇报.pptx"))  -> LoadedDocument(pages=[Page(1, ...), ...])  (one page per slide)
    load(Path("通知.png"))   -> LoadedDocument(pages=[Page(1, ..., ocr=True)])

Every failure a user can cause with a bad file is an :class:`IngestError` whose
``reason`` says what is wrong in words ("encrypted (password-protected)",
"empty file", "binary file ...", ...); files with an extension zhiku does not
read raise :class:`UnsupportedFile`. Nothing from the parsing libraries escapes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ingest.delimited import DELIMITERS, load_delimited
from ingest.documents import IngestError, LoadedDocument, Page, ReadOptions, UnsupportedFile
from ingest.ebooks import load_epub
from ingest.ocr import IMAGE_SUFFIXES, load_image
from ingest.office import LEGACY_SUFFIXES, load_docx, load_pptx, load_xlsx, refuse_legacy
from ingest.pdf import MIN_PDF_LETTERS, load_pdf_pages  # noqa: F401  (the names callers import from here)
from ingest.structured import load_json, load_jsonl
from ingest.text import decode_text, read_bytes  # noqa: F401
from ingest.webpages import load_html

PDF_SUFFIXES = frozenset({".pdf"})
TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown"})


def _load_text(path: Path) -> list[Page]:
    return [Page(None, decode_text(read_bytes(path), path))]


def _no_ocr(path: Path) -> list[Page]:
    raise IngestError(path, "image: only OCR reads it, and OCR is turned off (ZHIKU_OCR=false / --no-ocr)")


_LOADERS: dict[str, Callable[[Path], list[Page]]] = {
    **dict.fromkeys(TEXT_SUFFIXES, _load_text),
    ".docx": load_docx,
    ".xlsx": load_xlsx,
    ".pptx": load_pptx,
    **dict.fromkeys(LEGACY_SUFFIXES, refuse_legacy),
    ".html": load_html,
    ".htm": load_html,
    ".epub": load_epub,
    **dict.fromkeys(DELIMITERS, load_delimited),
    ".json": load_json,
    ".jsonl": load_jsonl,
}
SUPPORTED_SUFFIXES = frozenset(_LOADERS) | PDF_SUFFIXES | IMAGE_SUFFIXES
# Files slow enough to parse (PDF layout analysis, OCR) that even one is parsed in the parsing process.
SLOW_SUFFIXES = PDF_SUFFIXES | IMAGE_SUFFIXES


def load(path: Path, options: ReadOptions = ReadOptions()) -> LoadedDocument:
    """Load ``path`` by its extension (case-insensitive; see :data:`SUPPORTED_SUFFIXES`).

    ``options.ocr``: read images, and PDF pages without a usable text layer, by OCR;
    when False, images fail and scanned PDFs fail as "no extractable text (scanned?)".
    ``options.pdf_tables``: PDF tables row by row with their headers.
    Raises :class:`UnsupportedFile` for other extensions and :class:`IngestError`
    for files that cannot be read, with a reason meant for the user.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        return LoadedDocument(path, load_pdf_pages(path, ocr=options.ocr, tables=options.pdf_tables))
    if suffix in IMAGE_SUFFIXES:
        return LoadedDocument(path, load_image(path) if options.ocr else _no_ocr(path))
    loader = _LOADERS.get(suffix)
    if loader is None:
        raise UnsupportedFile(path, f"unsupported file type {suffix or '(no extension)'}")
    return LoadedDocument(path, loader(path))
