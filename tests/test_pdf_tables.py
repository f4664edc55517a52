"""Tables in PDFs: each row comes out with its column headers, the rest of the page stays text."""

from __future__ import annotations

from pathlib import Path

from ingest.documents import ReadOptions
from ingest.loaders import load
from ingest.pipeline import prepare_file
from tests.fixtures import _register_cid_font

ROWS = [["地区", "门店数", "营业额（万元）"], ["华东", "128", "56,300"], ["华南", "96", "41,250"], ["西北", "17", "5,080"]]
BEFORE = "下表列出各地区的门店数量和全年营业额。"
AFTER = "以上数据截至十二月三十一日。"


def make_table_pdf(path: Path) -> Path:
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    font = _register_cid_font()
    style = ParagraphStyle("zh", fontName=font, fontSize=12, leading=18)
    table = Table(ROWS)
    table.setStyle(TableStyle([("FONT", (0, 0), (-1, -1), font, 11), ("GRID", (0, 0), (-1, -1), 0.5, colors.black)]))
    SimpleDocTemplate(str(path), pagesize=A4).build([Paragraph(BEFORE, style), Spacer(1, 12), table, Spacer(1, 12), Paragraph(AFTER, style)])
    return path


def test_table_rows_carry_their_headers(tmp_path):
    path = make_table_pdf(tmp_path / "门店.pdf")
    text = load(path).pages[0].text
    assert "- 地区: 华东; 门店数: 128; 营业额（万元）: 56,300" in text.splitlines()
    assert "- 地区: 西北; 门店数: 17; 营业额（万元）: 5,080" in text.splitlines()
    assert BEFORE in text and AFTER in text  # the rest of the page is still there
    assert text.count("56,300") == 1  # the table is not also in the plain text
    chunks = prepare_file(path, 600, 120).chunks
    assert any("营业额（万元）: 41,250" in c.text and c.pages == (1,) for c in chunks)


def test_tables_can_be_turned_off(tmp_path):
    text = load(make_table_pdf(tmp_path / "门店.pdf"), ReadOptions(pdf_tables=False)).pages[0].text
    assert "华东 128 56,300" in text and "门店数: 128" not in text


def test_a_page_of_numbers_is_not_taken_for_a_scan(tmp_path):
    from tests.fixtures import make_chinese_pdf

    numbers = [[f"- {n}" for n in range(start, start + 30)] for start in (1, 31)]
    path = make_chinese_pdf(tmp_path / "numbers.pdf", pages=[["第一页有正文，说明这份文件的用途。"], *numbers])
    document = load(path)
    assert document.ocr_pages == () and "- 45" in document.pages[2].text


def test_stacked_rows_and_merged_headers_from_the_finder():
    from ingest.tables import pdf_table_text

    rows = [
        ["月度统计", None, None],
        ["城市", "门店\n直营\n加盟", None],
        ["北京\n上海", "12\n30", "5\n8"],
    ]
    assert pdf_table_text(rows).splitlines() == [
        "月度统计",
        "- 城市: 北京; 门店直营: 12; 门店加盟: 5",
        "- 城市: 上海; 门店直营: 30; 门店加盟: 8",
    ]


def test_nics_tables(shared_dir):
    pdfs = shared_dir / "corpus" / "pdfs"
    upright = load(pdfs / "nics-background-checks-2015-11.pdf").pages[0].text.splitlines()
    alabama = next(line for line in upright if line.startswith("- State / Territory: Alabama;"))
    assert alabama.endswith("Totals: 71,137")
    # the rotated copy's cells are scrambled: its page stays plain text
    rotated = load(pdfs / "nics-background-checks-2015-11-rotated.pdf").pages[0].text
    assert "- State / Territory" not in rotated
