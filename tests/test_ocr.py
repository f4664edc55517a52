"""OCR of images and scanned PDF pages (RapidOCR): known text rendered to pixels comes back,
only the pages without a text layer are OCR'd, OCR can be turned off, and a knowledge base
records per document which pages OCR read, on both backends."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.documents import IngestError, ReadOptions
from ingest.loaders import load
from ingest.pipeline import prepare_file
from memory.ingestion import Progress, add_paths
from memory.knowledge_base import STORE_DB, KnowledgeBases
from tests import format_fixtures as ff
from bench.ocr import character_accuracy
from tests.fixtures import make_chinese_pdf

pytestmark = pytest.mark.skipif(not ff.cjk_font_available(), reason="no CJK font to render Chinese pages with")

SCAN_PAGES = [
    ["第一页：公司决定自下月起调整员工的考勤制度。", "所有员工须在上午九点前完成打卡。"],
    ["第二页：因公外出的员工应提前在系统中登记。", "未按规定登记的，按缺勤处理。"],
]


def assert_read(text: str, lines: list[str], at_least: float = 0.9) -> None:
    """OCR read ``lines`` with a character accuracy of ``at_least`` (it may miss a rare
    character or confuse 门 and 内: the benchmark measures how often)."""
    accuracy = character_accuracy(text, "".join(lines))
    assert accuracy >= at_least, (accuracy, text)


def test_image_is_read_by_ocr(tmp_path):
    document = load(ff.make_text_image(tmp_path / "通知.png"))
    assert [(page.number, page.ocr) for page in document.pages] == [(1, True)]
    assert_read(document.pages[0].text, ff.OCR_LINES)
    assert "安全检查" in document.pages[0].text
    # lines of one paragraph are joined by cleaning, as for PDF text
    cleaned = prepare_file(tmp_path / "通知.png", 600, 120).cleaned.text
    assert_read(cleaned, ff.OCR_LINES)
    assert len(cleaned.splitlines()) <= 3


def test_scanned_pdf_is_read_page_by_page(tmp_path):
    path = ff.make_scanned_pdf(tmp_path / "扫描件.pdf", SCAN_PAGES)
    document = load(path)
    assert document.ocr_pages == (1, 2)
    for page, lines in zip(document.pages, SCAN_PAGES):
        assert_read(page.text, lines)
    prepared = prepare_file(path, 600, 120)
    assert prepared.ocr_pages == (1, 2) and {p for c in prepared.chunks for p in c.pages} == {1, 2}


def test_mixed_pdf_ocrs_only_its_scanned_pages(tmp_path):
    import pypdfium2

    text_pdf = make_chinese_pdf(tmp_path / "text.pdf", pages=[["这一页有文字层，不需要识别。", "文字层里的句子保持原样。"]])
    scan_pdf = ff.make_scanned_pdf(tmp_path / "scan.pdf", SCAN_PAGES[:1])
    mixed = pypdfium2.PdfDocument.new()
    for source in (text_pdf, scan_pdf):
        document = pypdfium2.PdfDocument(source)
        mixed.import_pages(document)
        document.close()
    mixed.save(tmp_path / "mixed.pdf")
    mixed.close()
    document = load(tmp_path / "mixed.pdf")
    assert [page.number for page in document.pages] == [1, 2] and document.ocr_pages == (2,)
    assert "这一页有文字层，不需要识别。" in document.pages[0].text
    assert_read(document.pages[1].text, SCAN_PAGES[0])


def test_ocr_turned_off(tmp_path):
    with pytest.raises(IngestError) as info:
        load(ff.make_text_image(tmp_path / "a.png"), ReadOptions(ocr=False))
    assert "OCR is turned off" in info.value.reason
    with pytest.raises(IngestError) as info:
        load(ff.make_scanned_pdf(tmp_path / "scan.pdf", SCAN_PAGES[:1]), ReadOptions(ocr=False))
    assert info.value.reason == "no extractable text (scanned?)"


def test_broken_images(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(IngestError, match="not an image, or a damaged one"):
        load(tmp_path / "bad.png")
    from PIL import Image

    Image.new("RGB", (400, 300), "white").save(tmp_path / "blank.jpg")
    with pytest.raises(IngestError, match="no text found by OCR"):
        load(tmp_path / "blank.jpg")


def test_multi_page_tiff(tmp_path):
    first = ff.render_pdf_page(make_chinese_pdf(tmp_path / "1.pdf", pages=[SCAN_PAGES[0]], header=None, footer=None))
    second = ff.render_pdf_page(make_chinese_pdf(tmp_path / "2.pdf", pages=[SCAN_PAGES[1]], header=None, footer=None))
    first.save(tmp_path / "传真.tiff", save_all=True, append_images=[second])
    document = load(tmp_path / "传真.tiff")
    assert [page.number for page in document.pages] == [1, 2] and document.ocr_pages == (1, 2)
    assert_read(document.pages[1].text, SCAN_PAGES[1])


@pytest.mark.parametrize("backend", ["local", "milvus"])
def test_knowledge_base_records_the_ocr_pages(tmp_path, settings, embedder, backend):
    folder = tmp_path / "docs"
    folder.mkdir()
    ff.make_scanned_pdf(folder / "扫描件.pdf", SCAN_PAGES)
    (folder / "说明.txt").write_text("普通文本，没有经过识别。", encoding="utf-8")
    kbs = KnowledgeBases.from_settings(settings.model_copy(update={"vector_store": backend}))
    try:
        report = add_paths(kbs, "扫描", [folder], embedder, chunk_size=120, chunk_overlap=20)
        assert report.exit_code == 0
        documents = {Path(d.path).name: d for d in kbs.documents("扫描")}
        assert documents["扫描件.pdf"].ocr_pages == (1, 2) and documents["说明.txt"].ocr_pages == ()
        kb = kbs.open("扫描")
        try:
            chunks = kb.all_chunks()
        finally:
            kb.close()
        scanned = documents["扫描件.pdf"]
        assert all(scanned.chunk_from_ocr(c.pages) for c in chunks if c.path == scanned.path)
        from rag.retrieval import Retriever  # passages say which of their pages came from OCR

        passages = Retriever.from_settings(settings, kbs, embedder).retrieve("扫描", SCAN_PAGES[0][0], top_k=5, score_threshold=-1.0)
        sources = {Path(p.source).name: p for p in passages}
        assert set(sources["扫描件.pdf"].ocr_pages) <= {1, 2} and sources["扫描件.pdf"].ocr_pages
        assert sources.get("说明.txt") is None or sources["说明.txt"].ocr_pages == ()
    finally:
        kbs.close()


def test_ingest_list_shows_ocr_pages_and_no_ocr_flag(tmp_path, settings, embedder):
    folder = tmp_path / "docs"
    folder.mkdir()
    ff.make_scanned_pdf(folder / "扫描件.pdf", SCAN_PAGES)
    env = {**os.environ, "ZHIKU_HOME": str(settings.home), "ZHIKU_MODELS_DIR": str(settings.model_cache)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cli.ingest", *args], env=env, capture_output=True, text=True, timeout=600)

    refused = cli("add", str(folder), "--kb", "关闭识别", "--no-ocr", "--json")
    assert refused.returncode == 1 and json.loads(refused.stdout)[0]["error"] == "no extractable text (scanned?)"
    assert cli("add", str(folder), "--kb", "扫描", "--json").returncode == 0
    listed = json.loads(cli("list", "--kb", "扫描", "--json").stdout)
    assert [(Path(d["path"]).name, d["ocr_pages"]) for d in listed] == [("扫描件.pdf", 2)]


def test_a_store_made_before_ocr_still_opens(tmp_path, settings, embedder):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("旧知识库里的文档。", encoding="utf-8")
    kbs = KnowledgeBases.from_settings(settings)
    add_paths(kbs, "旧库", [folder], embedder, chunk_size=120, chunk_overlap=20)
    manifest = kbs.manifest("旧库")
    database = settings.kb_root / "旧库" / manifest.store / STORE_DB
    with sqlite3.connect(database) as conn:  # as a store written before OCR existed
        conn.execute("ALTER TABLE documents DROP COLUMN ocr_pages")
    assert [d.ocr_pages for d in kbs.documents("旧库")] == [()]  # a reader copes
    (folder / "b.txt").write_text("新加入的文档。", encoding="utf-8")
    add_paths(kbs, "旧库", [folder], embedder, chunk_size=120, chunk_overlap=20)  # a writer migrates
    assert [d.ocr_pages for d in kbs.documents("旧库")] == [(), ()]


class _RecordedOcrPages(Progress):
    def __init__(self) -> None:
        self.pages: list[tuple[str, int, int]] = []

    def ocr_page(self, path: str, done: int, total: int) -> None:
        self.pages.append((Path(path).name, done, total))


def test_each_page_read_by_ocr_is_reported_from_the_parsing_process(tmp_path, settings, embedder):
    folder = tmp_path / "docs"
    folder.mkdir()
    ff.make_scanned_pdf(folder / "扫描件.pdf", SCAN_PAGES)
    ff.make_text_image(folder / "通知.png", work=tmp_path)
    progress = _RecordedOcrPages()
    kbs = KnowledgeBases.from_settings(settings)
    try:
        report = add_paths(kbs, "进度", [folder], embedder, chunk_size=120, chunk_overlap=20, progress=progress)
    finally:
        kbs.close()
    assert report.exit_code == 0
    assert sorted(progress.pages) == [("扫描件.pdf", 1, 2), ("扫描件.pdf", 2, 2), ("通知.png", 1, 1)]


def test_pages_are_reported_when_parsing_in_this_process_too(tmp_path):
    from ingest.ocr import ocr_pages_reported

    image = ff.make_text_image(tmp_path / "通知.png", work=tmp_path)
    seen = []
    with ocr_pages_reported(lambda *page: seen.append(page)):
        prepare_file(image, 600, 120)
    prepare_file(image, 600, 120)  # outside: no one is told
    assert seen == [(str(image), 1, 1)]
