"""The values that flow through ingest: a loaded file, its cleaned text, its chunks.

    load(path) -> LoadedDocument -> clean_document() -> CleanedDocument -> split_document() -> [Chunk]
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path


class IngestError(Exception):
    """A file that cannot be ingested; ``reason`` is shown to the user next to the path."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class UnsupportedFile(IngestError):
    """A file whose extension zhiku does not read; it is skipped, not failed."""


@dataclass(frozen=True)
class ReadOptions:
    """How files are read (``Settings.ocr``, ``Settings.pdf_tables``).

    ``ocr``: images, and PDF pages without a usable text layer, are read by OCR.
    ``pdf_tables``: tables found on PDF pages are emitted row by row with their headers.
    """

    ocr: bool = True
    pdf_tables: bool = True


@dataclass(frozen=True)
class Page:
    """Raw text of one page; ``number`` is 1-based for PDFs, slides and images, None for
    files without pages. ``ocr``: the text was read from the page's image, not its text layer."""

    number: int | None
    text: str
    ocr: bool = False


@dataclass(frozen=True)
class LoadedDocument:
    path: Path
    pages: list[Page]

    @property
    def ocr_pages(self) -> tuple[int, ...]:
        """The numbers of the pages read by OCR."""
        return tuple(page.number for page in self.pages if page.ocr and page.number is not None)


@dataclass(frozen=True)
class CleanedDocument:
    """Cleaned text of a whole document.

    ``page_starts[i]`` is the character offset in ``text`` where page
    ``page_numbers[i]`` begins (both empty for documents without pages).
    """

    path: Path
    text: str
    page_starts: list[int] = field(default_factory=list)
    page_numbers: list[int] = field(default_factory=list)

    def pages_between(self, start: int, end: int) -> tuple[int, ...]:
        """Page numbers covered by ``text[start:end]``.

        >>> CleanedDocument(Path("a.pdf"), "aaaa\\n\\nbbbb", [0, 6], [1, 2]).pages_between(2, 8)
        (1, 2)
        """
        if not self.page_starts:
            return ()
        first = max(bisect_right(self.page_starts, start) - 1, 0)
        last = max(bisect_right(self.page_starts, max(end - 1, start)) - 1, 0)
        return tuple(self.page_numbers[first : last + 1])


@dataclass(frozen=True)
class Chunk:
    """A piece of a cleaned document: ``text == document.text[start:end]``."""

    text: str
    ordinal: int
    start: int
    end: int
    pages: tuple[int, ...] = ()
