"""Office Open XML files: Word (.docx), Excel (.xlsx) and PowerPoint (.pptx).

    load_docx(Path("制度.docx"))   -> [Page(None, "# 第一章 总则\\n\\n本制度适用于…\\n\\n- 岗位: 经理; 额度: 5000")]
    load_xlsx(Path("报价.xlsx"))   -> [Page(None, "## 报价\\n\\n- 型号: A100; 单价: 120000\\n…")]
    load_pptx(Path("汇报.pptx"))   -> [Page(1, "# 标题\\n…"), Page(2, …), …]  (one page per slide)

Tables become one line per row with its headers (``ingest.tables``). A file that
is not a valid zip of the expected parts, or that is encrypted (Office saves a
password-protected file as an OLE compound file, not a zip), is an IngestError
naming the reason. The old binary formats (.doc, .xls, .ppt) are refused with
a clear request to convert them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ingest.documents import IngestError, Page
from ingest.packages import open_package, read_package
from ingest.tables import sheet_section, table_block

LEGACY_OFFICE = {
    ".doc": "old binary Word file (.doc): convert it to .docx (Word or LibreOffice: Save As .docx)",
    ".xls": "old binary Excel file (.xls): convert it to .xlsx (Excel or LibreOffice: Save As .xlsx)",
    ".ppt": "old binary PowerPoint file (.ppt): convert it to .pptx (PowerPoint or LibreOffice: Save As .pptx)",
}
LEGACY_SUFFIXES = frozenset(LEGACY_OFFICE)


def refuse_legacy(path: Path) -> list[Page]:
    raise IngestError(path, LEGACY_OFFICE[path.suffix.lower()])


# ------------------------------------------------------------------------ Word


def load_docx(path: Path) -> list[Page]:
    """Body paragraphs and tables in document order; headings as Markdown headings;
    headers, footers and comments (not part of the body) are left out."""
    import docx

    document = open_package(path, ".docx", docx.Document)
    return [Page(None, read_package(path, ".docx", lambda: "\n\n".join(_docx_blocks(document))))]


def _docx_blocks(document) -> Iterator[str]:
    from docx.table import Table

    for block in document.iter_inner_content():
        if isinstance(block, Table):
            text = table_block(_docx_rows(block))
        else:
            text = _docx_paragraph(block)
        if text.strip():
            yield text


def _docx_paragraph(paragraph) -> str:
    text = paragraph.text.strip()
    level = _heading_level(paragraph.style.name if paragraph.style is not None else "")
    return f"{'#' * level} {text}" if text and level else text


def _heading_level(style: str) -> int:
    """1 for "Title" and "Heading 1", n for "Heading n" (Word's built-in names, whatever the UI language)."""
    name = style.lower()
    if name == "title":
        return 1
    if name.startswith("heading "):
        number = name.removeprefix("heading ").strip()
        return min(int(number), 6) if number.isdigit() else 0
    return 0


def _docx_rows(table) -> Iterator[list[str]]:
    for row in table.rows:
        cells, seen = [], set()
        for cell in row.cells:
            if id(cell._tc) in seen:  # a merged cell is returned once per grid column it spans
                continue
            seen.add(id(cell._tc))
            cells.append(cell.text)
        yield cells


# ------------------------------------------------------------------------ Excel


def load_xlsx(path: Path) -> list[Page]:
    """Each sheet a section ("## sheet name"), each row a line carrying the column headers;
    cell values as last computed by Excel (not formulas); at most ``ingest.tables.MAX_SHEET_ROWS`` rows a sheet."""
    import openpyxl

    book = open_package(path, ".xlsx", lambda p: openpyxl.load_workbook(p, read_only=True, data_only=True))
    try:
        sections = read_package(path, ".xlsx", lambda: [sheet_section(sheet.title, sheet.iter_rows(values_only=True)) for sheet in book.worksheets])
    finally:
        book.close()
    return [Page(None, "\n\n".join(s for s in sections if s))]


# ------------------------------------------------------------------- PowerPoint


def load_pptx(path: Path) -> list[Page]:
    """One page per slide, numbered as in the deck: the title as a heading, then the text
    of every shape (groups included) in order, tables as rows, and the speaker notes."""
    import pptx

    deck = open_package(path, ".pptx", pptx.Presentation)
    return read_package(path, ".pptx", lambda: [Page(number, _slide_text(slide)) for number, slide in enumerate(deck.slides, 1)])


def _slide_text(slide) -> str:
    title = slide.shapes.title
    parts = []
    if title is not None and title.has_text_frame and title.text_frame.text.strip():
        parts.append("# " + " ".join(title.text_frame.text.split()))
    for shape in slide.shapes:
        if title is not None and shape.shape_id == title.shape_id:
            continue
        parts.extend(_shape_texts(shape))
    if slide.has_notes_slide:
        notes = slide.notes_slide.notes_text_frame
        if notes is not None and notes.text.strip():
            parts.append("备注 / Notes: " + notes.text.strip())
    return "\n\n".join(part for part in parts if part.strip())


def _shape_texts(shape) -> Iterator[str]:
    from pptx.enum.shapes import MSO_SHAPE_TYPE

    if shape.shape_type == MSO_SHAPE_TYPE.GROUP:
        for member in shape.shapes:
            yield from _shape_texts(member)
    elif getattr(shape, "has_table", False) and shape.has_table:
        yield table_block([cell.text for cell in row.cells] for row in shape.table.rows)
    elif shape.has_text_frame:
        yield "\n".join(p.strip() for p in shape.text_frame.text.splitlines() if p.strip())
