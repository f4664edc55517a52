"""Builders for the files the ingest tests need, made on the fly (no binary fixtures in git).

Also where the shared corpus lives (``../shared`` beside the checkout) and a marker
for tests that need it.
"""

from __future__ import annotations

import codecs
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS_ZH = SHARED / "corpus" / "zh"
CORPUS_PDFS = SHARED / "corpus" / "pdfs"
requires_shared = pytest.mark.skipif(not CORPUS_ZH.is_dir(), reason=f"shared corpus not present at {SHARED}")

PDF_HEADER = "知库测试手册（内部资料）"

# Body lines of the default Chinese PDF, one list per page. Sentences are broken in
# the middle, as PDF layout does; the first page's first sentence runs over two lines.
PDF_PAGES: list[list[str]] = [
    [
        "检索增强生成（RAG）先把文档切成若干较短的",
        "片段，再为每个片段计算向量并写入索引。",
        "用户提问时，系统检索出最相关的几个片段，",
        "连同问题一起交给大模型生成回答。",
    ],
    [
        "中文文本的句子之间往往没有空格，所以重新拼",
        "接被排版打断的行时不能插入空格。总理朱镕基",
        "曾经视察过这家工厂，这句话里有一个罕见字。",
    ],
    [
        "页眉和页脚在每一页重复出现，例如文档标题和",
        "页码，它们会在清洗时被识别并删除。",
        "English lines are joined with a space, and hyphen-",
        "ated words are joined back together.",
    ],
    [
        "最后一页说明分块的规则：每个分块不超过设定的",
        "字符数，相邻分块之间保留一定的重叠。",
    ],
]


def _register_cid_font() -> str:
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont

    name = "STSong-Light"
    if name not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(UnicodeCIDFont(name))
    return name


def make_chinese_pdf(
    path: Path,
    pages: Sequence[Sequence[str]] = PDF_PAGES,
    header: str | None = PDF_HEADER,
    footer: str | None = "{page} / {total}",
    encrypt: str | None = None,
) -> Path:
    """A PDF in reportlab's built-in CID font STSong-Light: every page carries the running
    ``header`` at the top, its ``pages[i]`` lines as body, and ``footer`` ("3 / 4") at the bottom.
    ``encrypt`` sets a user password."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    font = _register_cid_font()
    width, height = A4
    pdf = canvas.Canvas(str(path), pagesize=A4, encrypt=encrypt)
    pdf.setTitle("zhiku test")
    for number, lines in enumerate(pages, 1):
        if header:
            pdf.setFont(font, 9)
            pdf.drawString(72, height - 40, header)
        pdf.setFont(font, 12)
        y = height - 90
        for line in lines:
            pdf.drawString(72, y, line)
            y -= 20
        if footer:
            pdf.setFont(font, 9)
            pdf.drawCentredString(width / 2, 30, footer.format(page=number, total=len(pages)))
        pdf.showPage()
    pdf.save()
    return path


def make_textless_pdf(path: Path, pages: int = 2) -> Path:
    """A PDF with drawings and no text layer, like a scan."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    pdf = canvas.Canvas(str(path), pagesize=A4)
    for _ in range(pages):
        pdf.rect(72, 400, 300, 200, fill=1)
        pdf.line(72, 300, 500, 300)
        pdf.showPage()
    pdf.save()
    return path


def make_malformed_pdf(path: Path) -> Path:
    """Has a PDF header, then garbage: no cross-reference table, no objects."""
    rng = random.Random(932)
    path.write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + bytes(rng.randrange(256) for _ in range(2000)))
    return path


def write_text(path: Path, text: str, encoding: str = "utf-8", bom: bool = False) -> Path:
    """``text`` encoded with ``encoding``, with that encoding's BOM first when ``bom``."""
    boms = {
        "utf-8": codecs.BOM_UTF8,
        "utf-16-le": codecs.BOM_UTF16_LE,
        "utf-16-be": codecs.BOM_UTF16_BE,
        "utf-32-le": codecs.BOM_UTF32_LE,
    }
    path.write_bytes((boms[encoding] if bom else b"") + text.encode(encoding))
    return path


def make_binary_txt(path: Path) -> Path:
    """Binary data (a PNG signature, NUL bytes, random bytes) behind a ``.txt`` name."""
    rng = random.Random(7)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(rng.randrange(256) for _ in range(4000)))
    return path


def make_control_char_txt(path: Path) -> Path:
    """Valid UTF-8 without NUL bytes, but mostly control characters: not text."""
    rng = random.Random(11)
    path.write_bytes(bytes(rng.choice([1, 2, 3, 4, 5, 6, 0x0E, 0x1B, 0x7F]) for _ in range(3000)) + b"abc")
    return path
