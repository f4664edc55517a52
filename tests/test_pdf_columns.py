"""PDF pages set in columns are read column by column (ingest.pdf_columns)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.pdf import load_pdf_pages
from tests.fixtures import _register_cid_font

SHARED_PDFS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "pdfs"


def _columns_pdf(path: Path, columns: list[list[str]], *, heading: str = "", font: str = "Helvetica",
                 size: int = 10, column_width: float = 160, gutter: float = 14) -> Path:
    """One page: an optional full-width heading, then ``columns`` side by side, one line per string."""
    from reportlab.lib.pagesizes import letter
    from reportlab.pdfgen import canvas

    pdf = canvas.Canvas(str(path), pagesize=letter)
    top = letter[1] - 60
    if heading:
        pdf.setFont(font, 14)
        pdf.drawString(50, top, heading)
        top -= 30
    pdf.setFont(font, size)
    for index, lines in enumerate(columns):
        x = 50 + index * (column_width + gutter)
        for row, line in enumerate(lines):
            pdf.drawString(x, top - row * (size + 2), line)
    pdf.showPage()
    pdf.save()
    return path


def _prose(column: int, lines: int = 20) -> list[str]:
    return [f"column {column} sentence {row} reads on here" for row in range(lines)]


def _reading_order(text: str) -> list[tuple[int, int]]:
    found = []
    for line in text.splitlines():
        if line.startswith("column "):
            words = line.split()
            found.append((int(words[1]), int(words[3])))
    return found


@pytest.mark.parametrize("count", [2, 3])
def test_columns_are_read_one_after_another(tmp_path, count):
    pdf = _columns_pdf(tmp_path / "paper.pdf", [_prose(c) for c in range(count)], heading="A Heading Across The Page")
    text = load_pdf_pages(pdf)[0].text
    assert text.splitlines()[0] == "A Heading Across The Page"
    assert _reading_order(text) == [(c, row) for c in range(count) for row in range(20)]


def test_chinese_columns_are_read_one_after_another(tmp_path):
    font = _register_cid_font()
    columns = [[f"第{c}栏第{row}句：这一行中文说明分栏排版的读法。" for row in range(16)] for c in range(2)]
    pdf = _columns_pdf(tmp_path / "zh.pdf", columns, font=font, column_width=250, gutter=20)
    lines = [line for line in load_pdf_pages(pdf)[0].text.splitlines() if line.startswith("第")]
    assert lines == [line for column in columns for line in column]


def test_a_table_of_short_cells_keeps_its_rows(tmp_path):
    """Columns of numbers have gutters too; they are a table, read row by row."""
    cells = [[f"{c * 100 + row}" for row in range(20)] for c in range(4)]
    pdf = _columns_pdf(tmp_path / "table.pdf", cells, heading="Counts by region", column_width=80)
    lines = load_pdf_pages(pdf)[0].text.splitlines()
    assert lines[:3] == ["Counts by region", "0 100 200 300", "1 101 201 301"]


def test_one_column_page_is_unchanged(tmp_path):
    import pdfplumber

    pdf = _columns_pdf(tmp_path / "plain.pdf", [_prose(0, 30)], column_width=400)
    with pdfplumber.open(pdf) as document:
        expected = document.pages[0].extract_text()
    assert load_pdf_pages(pdf)[0].text == expected


@pytest.mark.skipif(not (SHARED_PDFS / "federal-register-2020-17221.pdf").is_file(), reason="needs ../shared/corpus")
def test_federal_register_three_columns_read_as_sentences():
    pages = load_pdf_pages(SHARED_PDFS / "federal-register-2020-17221.pdf")
    text = " ".join(pages[3].text.split())
    # one sentence of the middle column, which line-by-line reading interleaved with its neighbours
    assert ("To ensure that each airplane’s two AOA sensors are functioning properly upon return to service, "
            "the FAA proposes to mandate that operators perform an AOA sensor system test") in text
