"""End to end: prepare_file and iter_candidate_files on generated files, then on the real
documents in ../shared/corpus (skipped when the shared folder is absent)."""

from __future__ import annotations

import json
import math
import re
import time
import unicodedata
from functools import cache

import pytest

from ingest.clean import clean_document
from ingest.documents import IngestError, LoadedDocument, ReadOptions, UnsupportedFile
from ingest.loaders import load
from ingest.pipeline import SUPPORTED_SUFFIXES, PreparedDocument, iter_candidate_files, prepare_file
from ingest.split import split_document
from tests.fixtures import (
    CORPUS_PDFS,
    CORPUS_ZH,
    PDF_HEADER,
    SHARED,
    make_binary_txt,
    make_chinese_pdf,
    requires_shared,
    write_text,
)

SIZE, OVERLAP = 400, 80

_PAGE_NUMBER = re.compile(r"^\s*[-–—•·*]?\s*(?:第\s*)?\d{1,5}\s*(?:页|/\s*\d+)?\s*$")
# a scraped link-list item: "  • 网站设计和管理容易吗wordpress进入仪表盘" (short, no punctuation);
# Markdown links in someone's notes ("- [Stable Diffusion WebUI部署过程踩坑记录](https://...)")
# are references the author chose, i.e. content.
_LINK_ITEM = re.compile(r"^\s*[•·●▪◦]\s*[^，。！？；,.!?;]{1,60}$")


def is_junk(text: str) -> bool:
    """A chunk nobody wants as a search result: mostly page-number lines ("- 123"),
    mostly (70 %) link-list items, or hardly any letters at all (< 5 %; an ASCII table from
    a code block, at 14 %, is content)."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return True
    if sum(bool(_PAGE_NUMBER.match(line)) for line in lines) * 2 >= len(lines):
        return True
    if len(lines) >= 3 and sum(bool(_LINK_ITEM.match(line)) for line in lines) >= 0.7 * len(lines):
        return True
    visible = [ch for ch in text if not ch.isspace()]
    return sum(ch.isalpha() for ch in visible) < 0.05 * len(visible)


def cjk_count(text: str) -> int:
    return sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")


def check_chunks(prepared: PreparedDocument) -> None:
    text = prepared.cleaned.text
    for prev, cur in zip(prepared.chunks, prepared.chunks[1:]):
        assert prev.end - cur.start >= min(math.ceil(OVERLAP / 2), len(prev.text) - 1)
    for chunk in prepared.chunks:
        assert chunk.text == text[chunk.start : chunk.end]
        assert 0 < len(chunk.text) <= SIZE
        assert not is_junk(chunk.text), chunk.text


def test_is_junk():
    assert is_junk("- 3327\n- 3328\n- 3329\n- 3330")
    assert is_junk("  • apache搭建网站阿里云域名注册查询\n  • 网站设计和管理容易吗wordpress进入仪表盘\n  • 沈阳做网站汕头seo推广")
    assert is_junk("1 / 57\n\n2 / 57")
    assert not is_junk("各种代理\n\n- [github](https://ghproxy.com/)\n- [docker](https://dockerproxy.com/docs)\n- 降低功耗")
    assert not is_junk("LR 2.5e-5 学习率设置。 MIN_LR 2.5e-6 最小学习率设置。")


# ------------------------------------------------------------------ generated files


def test_prepare_chinese_pdf(tmp_path):
    prepared = prepare_file(make_chinese_pdf(tmp_path / "手册.pdf"), 60, 20)
    text = prepared.cleaned.text
    assert PDF_HEADER not in text  # running header gone
    assert not re.search(r"\d / 4", text)  # "n / N" footer gone
    assert prepared.cleaned.page_numbers == [1, 2, 3, 4]
    # the sentence the layout broke is whole again, with no space inserted
    assert "检索增强生成（RAG）先把文档切成若干较短的片段，再为每个片段计算向量并写入索引。" in text
    assert "所以重新拼接被排版打断的行时不能插入空格。总理朱镕基曾经视察过这家工厂" in text
    assert "English lines are joined with a space, and hyphenated words are joined back together." in text
    for start, number in zip(prepared.cleaned.page_starts, prepared.cleaned.page_numbers):
        assert prepared.cleaned.pages_between(start, start + 1) == (number,)
    assert {p for c in prepared.chunks for p in c.pages} == {1, 2, 3, 4}
    assert any(len(c.pages) == 2 for c in prepared.chunks)
    for chunk in prepared.chunks:
        assert chunk.text == text[chunk.start : chunk.end] and len(chunk.text) <= 60


def test_prepare_text_file(tmp_path):
    path = write_text(tmp_path / "笔记.txt", "当前位置: 首页 > 笔记\n\n⽂本⽂件的内容。\n", "gb18030")
    prepared = prepare_file(path, SIZE, OVERLAP)
    assert prepared.path == path
    assert prepared.cleaned.text == "文本文件的内容。"
    assert [(c.text, c.pages) for c in prepared.chunks] == [("文本文件的内容。", ())]


def test_prepare_junk_only_file(tmp_path):
    path = write_text(tmp_path / "junk.md", "当前位置: 首页 > news >正文\n\n- 1\n- 2\n- 3\n- 4\n\n推荐文章\n")
    with pytest.raises(IngestError) as info:
        prepare_file(path, SIZE, OVERLAP)
    assert info.value.reason == "no text after cleaning"


def test_prepare_propagates_load_errors(tmp_path):
    with pytest.raises(IngestError, match="binary file"):
        prepare_file(make_binary_txt(tmp_path / "x.txt"), SIZE, OVERLAP)
    (tmp_path / "a.docx").write_bytes(b"PK")
    with pytest.raises(IngestError, match="corrupt .docx"):
        prepare_file(tmp_path / "a.docx", SIZE, OVERLAP)
    (tmp_path / "a.key").write_bytes(b"PK")
    with pytest.raises(UnsupportedFile):
        prepare_file(tmp_path / "a.key", SIZE, OVERLAP)


def test_pipeline_reexports_suffixes():
    assert ".pdf" in SUPPORTED_SUFFIXES and ".md" in SUPPORTED_SUFFIXES


def test_iter_candidate_files(tmp_path):
    for name in ["b.txt", "a.md", "sub/c.pdf", "sub/deeper/d.docx", ".hidden.txt", ".git/config", "sub/.cache/e.txt"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    single = tmp_path / "sub" / "c.pdf"
    found = list(iter_candidate_files([tmp_path, single, tmp_path / "missing.txt"]))
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.md",
        "b.txt",
        "sub/c.pdf",
        "sub/deeper/d.docx",  # unsupported files are yielded too, to be reported as skipped
        "missing.txt",  # a path given explicitly is yielded even when it does not exist
    ]
    hidden = tmp_path / ".hidden.txt"
    assert list(iter_candidate_files([hidden])) == [hidden]


# ------------------------------------------------------------------ shared corpus

ZH_DOCS = [
    "rwkv-lora-finetune.txt",
    "chatglm3-multi-gpu-finetune.txt",
    "llm-notes.md",
    "modelarts-training-guide.pdf",
    "modelarts-inference-guide.pdf",
]


# Each corpus file is loaded once per session (pdfplumber takes seconds on the big PDFs);
# the cached PreparedDocument goes through the same steps as prepare_file.


@cache
def loaded_corpus(name: str) -> LoadedDocument:
    folder = CORPUS_ZH if (CORPUS_ZH / name).exists() else CORPUS_PDFS
    return load(folder / name)


@cache
def prepared_corpus(name: str) -> PreparedDocument:
    loaded = loaded_corpus(name)
    cleaned = clean_document(loaded)
    return PreparedDocument(loaded.path, cleaned, split_document(cleaned, SIZE, OVERLAP))


@requires_shared
@pytest.mark.parametrize("name", ZH_DOCS)
def test_chinese_corpus_documents(name):
    prepared = prepared_corpus(name)
    text = prepared.cleaned.text
    assert cjk_count(text) > 3000
    assert len(prepared.chunks) >= 50
    check_chunks(prepared)
    for junk in ["当前位置", "相关文章", "推荐文章", "共100000条", "#xff08;"]:
        assert junk not in text
    assert not [line for line in text.split("\n") if _PAGE_NUMBER.match(line)]
    assert not re.search(r"[\u2f00-\u2fdf]", text)  # Kangxi radicals


@requires_shared
def test_gb18030_blog_decodes_and_loses_its_link_list():
    text = prepared_corpus("rwkv-lora-finetune.txt").cleaned.text
    assert "希望降低模型推理成本" in text and "qa指令拼接——适合做问答类" in text
    assert "apache搭建网站阿里云域名注册查询" not in text
    assert text.endswith("http://www.dnsts.com.cn/news/49900.html")


@requires_shared
def test_kangxi_radicals_are_normalised():
    raw = loaded_corpus("chatglm3-multi-gpu-finetune.txt").pages[0].text
    assert "⽂" in raw and "⼀" in raw
    text = prepared_corpus("chatglm3-multi-gpu-finetune.txt").cleaned.text
    assert "⽂" not in text and "⼀" not in text
    assert "会生成对应的模型文件" in text and "出了一个基于P-Tuning v2的方式" in text


@requires_shared
def test_markdown_keeps_code_blocks_and_lists():
    text = prepared_corpus("llm-notes.md").cleaned.text
    assert "```sh\nsudo nethogs ens3\n\nconda create -n wenda python=3.10.9\nconda activate wenda\n" in text
    assert "\n- 降低功耗\n" in text
    assert "各种代理\n\n- [github](https://ghproxy.com/)\n- [docker](https://dockerproxy.com/docs)\n" in text


@requires_shared
@pytest.mark.parametrize("name,last_page", [("modelarts-training-guide.pdf", 7), ("modelarts-inference-guide.pdf", 10)])
def test_scraped_pdfs_lose_thousands_of_page_number_lines(name, last_page):
    raw = loaded_corpus(name)
    raw_lines = [line for page in raw.pages for line in page.text.split("\n")]
    assert sum(bool(re.fullmatch(r"- \d+", line)) for line in raw_lines) > 3000
    prepared = prepared_corpus(name)
    assert prepared.cleaned.page_numbers == list(range(1, last_page + 1))
    assert max(p for c in prepared.chunks for p in c.pages) == last_page
    assert not any(re.search(r"(?m)^- \d+$", c.text) for c in prepared.chunks)


@requires_shared
def test_eval_evidence_survives_cleaning_and_splitting():
    """Every evidence string of shared/eval/dev.jsonl is whole inside some chunk (compared
    after NFKC, lower-casing and removing whitespace, as the evaluation does)."""
    dev = SHARED / "eval" / "dev.jsonl"
    if not dev.exists():
        pytest.skip("no shared/eval/dev.jsonl")

    def norm(s: str) -> str:
        return re.sub(r"\s+", "", unicodedata.normalize("NFKC", s).lower())

    missing = []
    for line in dev.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        if not item["source"]:
            continue
        chunks = [norm(c.text) for c in prepared_corpus(item["source"]).chunks]
        missing += [(item["id"], e) for e in item["evidence"] if not any(norm(e) in c for c in chunks)]
    assert not missing


BROKEN_PDFS = {
    "empty.pdf": "empty file",
    "encrypted-aes-256.pdf": "encrypted (password-protected)",
    "password-example.pdf": "encrypted (password-protected)",
}
# a scanned page (one big image) whose only text is a stamped "2021 3 31": read by OCR
SCANNED_PDF = "malformed-from-issue-932.pdf"


@requires_shared
@pytest.mark.parametrize("name", sorted(BROKEN_PDFS))
def test_broken_pdfs_raise_ingest_error(name):
    with pytest.raises(IngestError) as info:
        load(CORPUS_PDFS / name)
    assert info.value.reason == BROKEN_PDFS[name]


@requires_shared
def test_scanned_pdf_is_read_by_ocr_unless_ocr_is_off():
    document = load(CORPUS_PDFS / SCANNED_PDF)
    assert document.ocr_pages == (1,)
    assert "重庆万州经济技术开发（集团）有限公司2021年度第二期债务融资工具定向募集说明书" in document.pages[0].text
    with pytest.raises(IngestError) as info:
        load(CORPUS_PDFS / SCANNED_PDF, ReadOptions(ocr=False))
    assert info.value.reason == "no extractable text (scanned?)"


@requires_shared
def test_evil_xobjects_terminates():
    started = time.perf_counter()
    doc = load(CORPUS_PDFS / "evil-xobjects.pdf")  # circular XObject references
    assert time.perf_counter() - started < 5
    assert "Hello world" in doc.pages[0].text


@requires_shared
def test_corrupted_stream_is_recovered():
    # pdfminer logs "Data-loss while decompressing corrupted data" but gets every line
    text = prepare_file(CORPUS_PDFS / "zen_of_python_corrupted.pdf", SIZE, OVERLAP).cleaned.text
    assert "Beautiful is better than ugly." in text
    assert "Namespaces are one honking great idea" in text


GOOD_PDFS = {
    "2023-06-20-PV.pdf": "PROCÈS-VERBAL",
    "federal-register-2020-17221.pdf": "Boeing",
    "issue-33-lorem-ipsum.pdf": "Voluptatem",
    "kampo-japanese.pdf": "官",
    "nics-background-checks-2015-11.pdf": "Alabama",
    "nics-background-checks-2015-11-rotated.pdf": "Alabama",
    "scotus-transcript-p1.pdf": "SUPREME COURT",
    "issue-449-vertical.pdf": "V",
}


@requires_shared
def test_corpus_pdfs_are_all_classified():
    assert {p.name for p in CORPUS_PDFS.glob("*.pdf")} == (
        set(BROKEN_PDFS) | set(GOOD_PDFS) | {SCANNED_PDF, "evil-xobjects.pdf", "zen_of_python_corrupted.pdf"}
    )


@requires_shared
@pytest.mark.parametrize("name", sorted(GOOD_PDFS))
def test_good_pdfs_load_with_text(name):
    prepared = prepared_corpus(name)
    assert GOOD_PDFS[name] in prepared.cleaned.text
    assert prepared.chunks and prepared.cleaned.page_numbers[0] == 1


@requires_shared
def test_federal_register_running_header_and_footer_are_gone():
    text = prepared_corpus("federal-register-2020-17221.pdf").cleaned.text
    assert "Federal Register/Vol. 85, No. 152" not in text
    assert text.count("VerDate") <= 2  # only where layout merged it into a content line
    assert "llebj" not in text
