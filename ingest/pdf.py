"""PDFs: the text layer of every page, numbered from 1.

Every failure a damaged or protected PDF causes is an IngestError naming it;
nothing from pdfminer escapes.
"""

from __future__ import annotations

import re
from pathlib import Path

from ingest.documents import IngestError, Page
from ingest.pdf_columns import reading_order_text
from ingest.tables import pdf_table_text
from ingest.text import read_bytes

# A PDF needs at least this many letters / CJK characters in its text layer to
# count as having text; scanned pages often carry nothing but a stamped date
# or page numbers ("2021 3 31").
MIN_PDF_LETTERS = 8

_CID = re.compile(r"\(cid:\d+\)")


def load_pdf_pages(path: Path, *, ocr: bool = False, tables: bool = False) -> list[Page]:
    """Text of every page of a PDF, numbered from 1.

    With ``ocr``, a page whose text layer has fewer than :data:`MIN_PDF_LETTERS`
    letters and :data:`MIN_LAYER_CHARACTERS` characters (a scan, or glyphs without a
    Unicode mapping; not a page of numbers) is rendered and read by
    OCR instead (``Page.ocr``); the other pages keep their text layer.
    With ``tables``, tables found on a page (see :func:`page_text`) follow the rest
    of its text, one line per row with its headers.

    Raises IngestError: "empty file", "encrypted (password-protected)",
    "malformed PDF: ...", or "no extractable text (scanned?)".
    """
    data = read_bytes(path)
    if not data:
        raise IngestError(path, "empty file")
    if b"%PDF-" not in data[:1024]:
        raise IngestError(path, "malformed PDF: not a PDF file (no %PDF- header)")

    import pdfplumber  # heavy import, only when a PDF is loaded
    from pdfminer.pdfdocument import PDFEncryptionError, PDFPasswordIncorrect
    from pdfminer.psexceptions import PSException
    from pdfplumber.utils.exceptions import MalformedPDFException, PdfminerException

    pages: list[Page] = []
    try:
        with pdfplumber.open(path, raise_unicode_errors=False) as pdf:
            for page in pdf.pages:
                try:
                    pages.append(Page(page.page_number, page_text(page, tables)))
                finally:
                    page.close()  # drop the page's parsed objects: memory stays flat on long PDFs
    except PdfminerException as exc:
        # pdfplumber wraps whatever pdfminer raised while opening or parsing a page.
        cause = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
        if isinstance(cause, PDFPasswordIncorrect):
            raise IngestError(path, "encrypted (password-protected)") from None
        if isinstance(cause, PDFEncryptionError):
            raise IngestError(path, f"encrypted (unsupported encryption: {_describe(cause)})") from None
        if isinstance(cause, RecursionError):
            raise IngestError(path, "malformed PDF: objects nested too deeply (circular references?)") from None
        if isinstance(cause, MemoryError):
            raise cause from None
        raise IngestError(path, f"malformed PDF: {_describe(cause)}") from None
    except (PSException, MalformedPDFException) as exc:
        raise IngestError(path, f"malformed PDF: {_describe(exc)}") from None
    except RecursionError:
        raise IngestError(path, "malformed PDF: objects nested too deeply (circular references?)") from None
    except MemoryError:
        raise
    except OSError as exc:
        raise IngestError(path, f"cannot read file: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - pdfminer signals bad input with plain KeyError, TypeError, ...
        raise IngestError(path, f"malformed PDF: {_describe(exc)}") from None

    if not pages:
        raise IngestError(path, "malformed PDF: no pages")
    if ocr:
        pages = _ocr_textless_pages(path, pages)
    if sum(map(letter_count, (page.text for page in pages))) < MIN_PDF_LETTERS:
        raise IngestError(path, "no extractable text (scanned? OCR found none either)" if ocr else "no extractable text (scanned?)")
    return pages


# A table needs this many rows (header included) and columns to be read as one: the
# finder also frames single boxes and two-cell captions.
MIN_TABLE_ROWS = 2
MIN_TABLE_COLUMNS = 2
# Pages with fewer upright characters than this share (rotated scans of tables,
# vertical text) are left to plain text: the finder's cells there are scrambled.
MIN_UPRIGHT_SHARE = 0.9


def page_text(page, tables: bool) -> str:
    """A pdfplumber page's text in reading order (column by column: ``ingest.pdf_columns``); with
    ``tables``, the text outside its tables, then each table as rows carrying their headers
    (``ingest.tables``)."""
    found = _tables(page) if tables else []
    if not found:
        return reading_order_text(page)
    rest = page
    for table in found:
        rest = rest.outside_bbox(table.bbox)
    blocks = [pdf_table_text(table.extract()) for table in found]
    return "\n\n".join(part for part in [reading_order_text(rest), *blocks] if part.strip())


def _tables(page) -> list:
    chars = page.chars
    if not chars or page.rotation % 360 or sum(1 for c in chars if c.get("upright", True)) < MIN_UPRIGHT_SHARE * len(chars):
        return []
    found = []
    for table in page.find_tables():
        rows = table.rows
        if len(rows) >= MIN_TABLE_ROWS and max((len(r.cells) for r in rows), default=0) >= MIN_TABLE_COLUMNS:
            found.append(table)
    return found


def letter_count(text: str) -> int:
    """Letters and CJK characters of a text layer, pdfminer's (cid:N) placeholders not counted."""
    return sum(1 for ch in _CID.sub("", text) if ch.isalpha())


# A page with fewer letters than MIN_PDF_LETTERS still has a text layer when it holds this
# many other characters: a page of numbers (a table, a list of page numbers) is not a scan.
MIN_LAYER_CHARACTERS = 40


def _textless(text: str) -> bool:
    """No usable text layer: too few letters, and not a page of digits either."""
    layer = "".join(_CID.sub("", text).split())
    return letter_count(text) < MIN_PDF_LETTERS and len(layer) < MIN_LAYER_CHARACTERS


# Pages are rendered at this resolution for OCR: the recogniser wants text lines
# about 30-50 pixels high, which 10.5-pt body text is at 200 dpi.
OCR_DPI = 200


def _ocr_textless_pages(path: Path, pages: list[Page]) -> list[Page]:
    """``pages`` with every page that has no usable text layer replaced by its OCR'd text
    (when OCR reads more letters than the text layer has)."""
    textless = [i for i, page in enumerate(pages) if _textless(page.text)]
    if not textless:
        return pages
    import pypdfium2

    from ingest.ocr import read_image, report_page

    pages = list(pages)
    try:
        document = pypdfium2.PdfDocument(path)
    except pypdfium2.PdfiumError as exc:
        raise IngestError(path, f"malformed PDF: cannot render pages for OCR ({exc})") from None
    try:
        for done, i in enumerate(textless, 1):
            image = document[i].render(scale=OCR_DPI / 72).to_pil()
            text = read_image(image)
            if letter_count(text) > letter_count(pages[i].text):
                pages[i] = Page(pages[i].number, text, ocr=True)
            report_page(path, done, len(textless))
    finally:
        document.close()
    return pages


def _describe(exc: BaseException) -> str:
    message = str(exc).strip()
    name = type(exc).__name__
    if not message:
        return name
    if len(message) > 200:
        message = message[:200] + "…"
    return f"{name}: {message}"
