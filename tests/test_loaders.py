"""ingest.loaders: PDFs with page numbers, text files in any common Chinese encoding,
and a clear IngestError for everything a user can get wrong."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ingest.documents import IngestError, ReadOptions, UnsupportedFile
from ingest.loaders import SUPPORTED_SUFFIXES, decode_text, load
from tests.fixtures import (
    PDF_HEADER,
    PDF_PAGES,
    make_binary_txt,
    make_chinese_pdf,
    make_control_char_txt,
    make_malformed_pdf,
    make_textless_pdf,
    write_text,
)


def reason(path: Path) -> str:
    with pytest.raises(IngestError) as info:
        load(path)
    return info.value.reason


# ------------------------------------------------------------------ dispatch


def test_supported_suffixes():
    assert {".pdf", ".txt", ".md", ".markdown"} <= SUPPORTED_SUFFIXES


@pytest.mark.parametrize("name", ["keynote.key", "drawing.svg", "Makefile", "archive.tar.gz"])
def test_other_extensions_are_unsupported(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"whatever")
    with pytest.raises(UnsupportedFile) as info:
        load(path)
    assert isinstance(info.value, IngestError)
    assert "unsupported file type" in info.value.reason
    assert info.value.path == str(path)


@pytest.mark.parametrize("name", ["笔记.TXT", "notes.Md", "notes.markdown"])
def test_extensions_are_case_insensitive(tmp_path, name):
    doc = load(write_text(tmp_path / name, "# 标题\n\n正文。"))
    assert doc.pages[0].number is None
    assert doc.pages[0].text == "# 标题\n\n正文。"


def test_missing_file_and_directory(tmp_path):
    assert reason(tmp_path / "nope.txt") == "no such file"
    (tmp_path / "dir.md").mkdir()
    assert "directory" in reason(tmp_path / "dir.md")


# ------------------------------------------------------------------ PDF


def test_chinese_pdf_keeps_page_numbers(tmp_path):
    doc = load(make_chinese_pdf(tmp_path / "手册.pdf"))
    assert [page.number for page in doc.pages] == [1, 2, 3, 4]
    for number, (page, lines) in enumerate(zip(doc.pages, PDF_PAGES), 1):
        # the loader returns raw text: header and "n / N" footer are still there
        assert page.text.startswith(PDF_HEADER)
        assert page.text.endswith(f"{number} / 4")
        assert lines[0] in page.text
    assert "朱镕基" in doc.pages[1].text


def test_empty_pdf(tmp_path):
    path = tmp_path / "empty.pdf"
    path.write_bytes(b"")
    assert reason(path) == "empty file"


def test_encrypted_pdf(tmp_path):
    path = make_chinese_pdf(tmp_path / "secret.pdf", encrypt="s3cret")
    assert reason(path) == "encrypted (password-protected)"


def test_malformed_pdf(tmp_path):
    assert reason(make_malformed_pdf(tmp_path / "broken.pdf")).startswith("malformed PDF: ")


def test_truncated_pdf(tmp_path):
    good = make_chinese_pdf(tmp_path / "good.pdf").read_bytes()
    path = tmp_path / "truncated.pdf"
    path.write_bytes(good[: len(good) // 2])
    assert reason(path).startswith("malformed PDF: ")


def test_not_a_pdf(tmp_path):
    path = write_text(tmp_path / "page.pdf", "<html><body>404 Not Found</body></html>")
    assert reason(path) == "malformed PDF: not a PDF file (no %PDF- header)"


def test_pdf_without_text_layer(tmp_path):
    with pytest.raises(IngestError) as info:
        load(make_textless_pdf(tmp_path / "scan.pdf"), ReadOptions(ocr=False))
    assert info.value.reason == "no extractable text (scanned?)"
    # with OCR (the default) the drawings are read too, and hold no text either
    assert reason(tmp_path / "scan.pdf") == "no extractable text (scanned? OCR found none either)"


def test_pdf_with_only_page_numbers_has_no_text(tmp_path):
    path = make_chinese_pdf(tmp_path / "numbers.pdf", pages=[["1"], ["2"]], header=None)
    with pytest.raises(IngestError) as info:
        load(path, ReadOptions(ocr=False))
    assert info.value.reason == "no extractable text (scanned?)"


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(lambda: __import__("pdfminer.psexceptions").psexceptions.PSEOF("Unexpected EOF"), id="PSEOF"),
        pytest.param(lambda: __import__("pdfminer.pdfparser").pdfparser.PDFSyntaxError("bad xref"), id="syntax"),
        pytest.param(lambda: KeyError("Contents"), id="KeyError"),
        pytest.param(lambda: TypeError("'PDFObjRef' object is not iterable"), id="TypeError"),
        pytest.param(lambda: RecursionError("maximum recursion depth exceeded"), id="recursion"),
    ],
)
def test_any_pdfminer_failure_becomes_ingest_error(tmp_path, monkeypatch, exc):
    import pdfplumber

    path = make_chinese_pdf(tmp_path / "ok.pdf")

    def explode(*args, **kwargs):
        raise exc()

    monkeypatch.setattr(pdfplumber, "open", explode)
    assert reason(path).startswith("malformed PDF: ")


def test_failure_while_reading_a_page_becomes_ingest_error(tmp_path, monkeypatch):
    from pdfplumber.page import Page as PlumberPage

    path = make_chinese_pdf(tmp_path / "ok.pdf")

    def explode(self, *args, **kwargs):
        raise ValueError("could not convert string to float: b'1..2'")

    monkeypatch.setattr(PlumberPage, "extract_text", explode)
    assert reason(path) == "malformed PDF: ValueError: could not convert string to float: b'1..2'"


def test_pdf_load_is_fast(tmp_path):
    path = make_chinese_pdf(tmp_path / "fast.pdf", pages=PDF_PAGES * 5)
    started = time.perf_counter()
    assert len(load(path).pages) == 20
    assert time.perf_counter() - started < 10


# ------------------------------------------------------------------ text files

RARE = "朱镕基视察工厂，㐀是扩展A区的字，䶮也是。"


def test_utf8(tmp_path):
    assert load(write_text(tmp_path / "a.txt", RARE)).pages[0].text == RARE


def test_utf8_bom_is_dropped(tmp_path):
    text = "⽂本带有BOM。"
    assert load(write_text(tmp_path / "bom.txt", text, bom=True)).pages[0].text == text


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le"])
def test_utf16_and_utf32_with_bom(tmp_path, encoding):
    assert load(write_text(tmp_path / "wide.txt", RARE, encoding, bom=True)).pages[0].text == RARE


def test_utf16_without_bom_is_detected(tmp_path):
    text = "This file is UTF-16 without a BOM. 这是没有字节序标记的文件。" * 5
    assert load(write_text(tmp_path / "nobom.txt", text, "utf-16-le")).pages[0].text == text


def test_gbk_file_with_rare_character(tmp_path):
    # 镕 is in GBK; chardet calls this GB2312/GBK/GB18030, and it is decoded as GB18030
    text = "总理朱镕基在一九九八年说过：“不管前面是地雷阵还是万丈深渊，我都将勇往直前。”"
    assert load(write_text(tmp_path / "gbk.txt", text, "gbk")).pages[0].text == text


def test_gb18030_only_characters_survive(tmp_path):
    # 㐀 and 䶮 are not in GBK at all: only decoding as GB18030 keeps them
    text = "这是中文文本，包含扩展A区的罕见字㐀和䶮，还有朱镕基的镕。" * 3
    assert load(write_text(tmp_path / "gb18030.md", text, "gb18030")).pages[0].text == text


def test_short_gbk_file(tmp_path):
    assert load(write_text(tmp_path / "short.txt", "你好", "gbk")).pages[0].text == "你好"


@pytest.mark.parametrize(
    "text,encoding",
    [
        ("這是繁體中文的句子，測試編碼是否被正確識別。" * 5, "big5"),
        ("これは日本語の文章です。文字コードを判定します。" * 5, "shift_jis"),
        ("Le café est très bon. Résumé : naïve façade à Montréal.\n" * 5, "cp1252"),
    ],
)
def test_other_legacy_encodings_chardet_is_sure_of(tmp_path, text, encoding):
    assert load(write_text(tmp_path / "legacy.txt", text, encoding)).pages[0].text == text


def test_strict_utf8_is_tried_first():
    # valid UTF-8 is never handed to chardet (which might guess a legacy encoding)
    assert decode_text("naïve café – ok".encode()) == "naïve café – ok"


def test_utf8_with_a_bad_byte_stays_utf8(tmp_path):
    text = "这是一个UTF-8文件，内容很长。" * 50
    path = tmp_path / "cut.txt"
    path.write_bytes(text.encode() + "镕".encode()[:2])  # cut in the middle of the last character
    assert load(path).pages[0].text == text + "\ufffd"


def test_mostly_ascii_gbk_file_is_not_read_as_broken_utf8(tmp_path):
    text = "Maintainer: 朱镕基 <zhu@example.com>\n" + "All the rest of this file is ASCII.\n" * 20
    assert load(write_text(tmp_path / "README.txt", text, "gbk")).pages[0].text == text


def test_binary_file_with_text_extension(tmp_path):
    assert reason(make_binary_txt(tmp_path / "image.txt")).startswith("binary file")


def test_control_characters_are_binary(tmp_path):
    assert reason(make_control_char_txt(tmp_path / "ctrl.md")).startswith("binary file")


@pytest.mark.parametrize("content", [b"", b"   \n\t\r\n  ", b"\xef\xbb\xbf", "\u3000\u3000\n".encode()])
def test_empty_text_files(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    assert reason(path).startswith("no text")
