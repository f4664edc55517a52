"""The loaders of Word, Excel, PowerPoint, web pages, e-books, CSV/TSV and JSON: the text
arrives, the junk does not, pages are numbered, and every broken file is one IngestError
naming its reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.documents import IngestError
from ingest.loaders import SUPPORTED_SUFFIXES, load
from ingest.pipeline import prepare_file
from ingest.tables import MAX_SHEET_ROWS
from tests import format_fixtures as ff


def text_of(path: Path) -> str:
    return prepare_file(path, 600, 120).cleaned.text


def reason(path: Path) -> str:
    with pytest.raises(IngestError) as info:
        load(path)
    return info.value.reason


def test_every_new_format_is_supported():
    assert {".docx", ".xlsx", ".pptx", ".html", ".htm", ".epub", ".csv", ".tsv", ".json", ".jsonl", ".png", ".jpg", ".tiff"} <= SUPPORTED_SUFFIXES


# ---- Word


def test_docx_keeps_headings_body_and_table_rows_and_drops_header_and_footer(tmp_path):
    text = text_of(ff.make_docx(tmp_path / "制度.docx"))
    assert text.startswith(f"# {ff.DOCX_TITLE}\n\n{ff.DOCX_BODY}")
    assert "## 住宿标准" in text
    assert "- 职级: 经理; 住宿标准（元/晚）: 600; 交通: 高铁一等座" in text.splitlines()
    assert text.index("住宿标准（元/晚）: 400") < text.index("超出标准的部分")  # document order
    assert ff.DOCX_HEADER not in text and ff.DOCX_FOOTER not in text


def test_old_binary_word_asks_for_conversion(tmp_path):
    path = ff.make_encrypted_office(tmp_path / "旧制度.doc")
    assert reason(path) == "old binary Word file (.doc): convert it to .docx (Word or LibreOffice: Save As .docx)"


@pytest.mark.parametrize("suffix", [".docx", ".xlsx", ".pptx"])
def test_password_protected_office_file(tmp_path, suffix):
    assert reason(ff.make_encrypted_office(tmp_path / f"secret{suffix}")).startswith("encrypted (password-protected)")


@pytest.mark.parametrize("suffix, make", [(".docx", ff.make_docx), (".xlsx", ff.make_xlsx), (".pptx", ff.make_pptx)])
def test_damaged_office_files(tmp_path, suffix, make):
    good = make(tmp_path / f"good{suffix}")
    assert reason(ff.make_truncated_zip(tmp_path / f"cut{suffix}", good)) == f"corrupt {suffix} file (not a zip package)"
    assert reason(ff.make_zip_without_parts(tmp_path / f"other{suffix}")).startswith(f"corrupt {suffix} file (")
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    assert reason(tmp_path / f"empty{suffix}") == "empty file"


# ---- Excel, CSV, TSV


def test_xlsx_rows_carry_their_headers_sheet_by_sheet(tmp_path):
    text = text_of(ff.make_xlsx(tmp_path / "报价.xlsx"))
    lines = text.splitlines()
    assert lines[0] == "## 报价"
    assert "- 型号: H100; 显存: 80GB; 单价（元）: 230000" in lines
    assert "## 联系人" in lines and "- 姓名: 张三; 电话: 13800000000" in lines
    assert "=C2" not in text  # values, never formulas


def test_huge_sheet_is_bounded_and_says_so(tmp_path, monkeypatch):
    import ingest.tables

    monkeypatch.setattr(ingest.tables.sheet_section, "__defaults__", (5,))
    text = load(ff.make_xlsx(tmp_path / "big.xlsx", extra_rows=20)).pages[0].text
    assert text.count("\n- 型号: ") == 5
    assert "rows after the first 5 not read" in text
    assert "X19" not in text and MAX_SHEET_ROWS >= 10_000


@pytest.mark.parametrize("name, delimiter", [("人口.csv", ","), ("人口.tsv", "\t")])
def test_gbk_csv_and_tsv_rows_carry_their_headers(tmp_path, name, delimiter):
    text = text_of(ff.make_csv(tmp_path / name, delimiter))
    assert text.splitlines() == [
        "- 城市: 北京; 常住人口（万）: 2189; 面积（平方公里）: 16410",
        "- 城市: 上海; 常住人口（万）: 2487; 面积（平方公里）: 6340",
    ]


def test_binary_csv_is_refused(tmp_path):
    (tmp_path / "data.csv").write_bytes(b"\x00\x01\x02" * 300)
    assert reason(tmp_path / "data.csv").startswith("binary file")


# ---- PowerPoint


def test_pptx_one_page_per_slide_with_title_body_table_and_notes(tmp_path):
    document = load(ff.make_pptx(tmp_path / "汇报.pptx"))
    assert [page.number for page in document.pages] == [1, 2]
    first, second = (page.text for page in document.pages)
    assert first.startswith("# 季度汇报") and "本季度营收增长百分之二十" in first and "讲者备注：先讲营收" in first
    assert second.startswith("# 下季度计划") and "- 区域: 华东; 目标人数: 30" in second
    chunks = prepare_file(tmp_path / "汇报.pptx", 600, 120).chunks
    assert any(2 in c.pages and "华东" in c.text for c in chunks)


# ---- web pages


@pytest.mark.parametrize("encoding", ["gb2312", "utf-8"])
def test_html_keeps_the_article_and_drops_the_site(tmp_path, encoding):
    text = text_of(ff.make_html(tmp_path / "通知.html", encoding))
    assert text.startswith(f"# {ff.HTML_TITLE}")
    for paragraph in ff.HTML_ARTICLE:
        assert paragraph in text
    for junk in [*ff.HTML_JUNK, "统计代码", "color: red", "当前位置", "2025年春节放假通知"]:
        assert junk not in text, junk


def test_htm_page_that_is_all_content(tmp_path):
    path = tmp_path / "note.htm"
    path.write_text("<html><body><h2>会议纪要</h2><p>决定下周一上线新版本。</p></body></html>", encoding="utf-8")
    assert "决定下周一上线新版本。" in text_of(path)


def test_xhtml_page_with_its_own_xml_encoding_declaration(tmp_path):
    # saved XHTML pages start with an XML declaration, which lxml refuses in decoded text
    path = tmp_path / "通知.html"
    page = '<?xml version="1.0" encoding="gb2312"?>\n<html xmlns="http://www.w3.org/1999/xhtml"><head><title>停电通知</title></head>'
    path.write_bytes((page + "<body><p>周六上午九点到十二点，三号楼停电检修。</p></body></html>").encode("gb2312"))
    text = text_of(path)
    assert text.startswith("# 停电通知") and "三号楼停电检修" in text


def test_binary_html_is_refused(tmp_path):
    (tmp_path / "page.html").write_bytes(b"\x00\xff\xfe\x01" * 500)
    assert reason(tmp_path / "page.html").startswith("binary file")


# ---- e-books


def test_epub_chapters_in_reading_order_with_titles(tmp_path):
    text = text_of(ff.make_epub(tmp_path / "手册.epub"))
    (first_title, first_body), (second_title, second_body) = ff.EPUB_CHAPTERS
    assert text.startswith(f"# {first_title}\n\n{first_body}")
    assert text.index(first_body) < text.index(f"# {second_title}") < text.index(second_body)
    assert text.count(first_title) == 1  # the navigation document is not a chapter


def test_broken_and_protected_epubs(tmp_path):
    good = ff.make_epub(tmp_path / "good.epub")
    assert reason(ff.make_drm_epub(tmp_path / "drm.epub", good)) == "encrypted (DRM-protected e-book)"
    assert reason(ff.make_truncated_zip(tmp_path / "cut.epub", good)) == "corrupt .epub file (not a zip package)"
    assert reason(ff.make_zip_without_parts(tmp_path / "other.epub")).startswith("corrupt .epub file (")


# ---- JSON


@pytest.mark.parametrize("name, make", [("faq.json", ff.make_json), ("faq.jsonl", ff.make_jsonl)])
def test_json_records_as_key_value_lines(tmp_path, name, make):
    text = text_of(make(tmp_path / name))
    records = text.split("\n\n")
    assert records[0].splitlines() == ["- 问题: 如何重置密码", "- 答案: 在登录页点击忘记密码", "- 标签: 账号, 安全", "- 元数据.作者: 客服部"]
    assert len(records) == 2 and "{" not in text and '"' not in text


def test_malformed_json(tmp_path):
    (tmp_path / "bad.json").write_text('{"a": 1,,}', encoding="utf-8")
    assert reason(tmp_path / "bad.json").startswith("malformed JSON: ")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"b": \n', encoding="utf-8")
    assert reason(tmp_path / "bad.jsonl").startswith("malformed JSON Lines: line 2: ")
