"""Files of every format zhiku reads, written by the libraries that read them (and broken ones)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from ingest.packages import OLE_MAGIC

DOCX_TITLE = "差旅报销制度"
DOCX_BODY = "员工出差应当提前在系统中提交出差申请，经部门负责人批准后方可出行。"
DOCX_HEADER = "内部文件 请勿外传"
DOCX_FOOTER = "第 1 页 共 1 页"
DOCX_TABLE = [["职级", "住宿标准（元/晚）", "交通"], ["经理", "600", "高铁一等座"], ["员工", "400", "高铁二等座"]]


def make_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    section = document.sections[0]
    section.header.paragraphs[0].text = DOCX_HEADER
    section.footer.paragraphs[0].text = DOCX_FOOTER
    document.add_heading(DOCX_TITLE, level=1)
    document.add_paragraph(DOCX_BODY)
    document.add_heading("住宿标准", level=2)
    table = document.add_table(rows=len(DOCX_TABLE), cols=len(DOCX_TABLE[0]))
    for r, row in enumerate(DOCX_TABLE):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    document.add_paragraph("超出标准的部分由员工自行承担。")
    document.save(path)
    return path


XLSX_ROWS = [["型号", "显存", "单价（元）"], ["A100", "80GB", 120000], ["H100", "80GB", 230000], ["L40S", "48GB", 65000]]


def make_xlsx(path: Path, extra_rows: int = 0) -> Path:
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "报价"
    for row in XLSX_ROWS:
        sheet.append(row)
    sheet["D1"] = "含税价"
    for r in range(2, len(XLSX_ROWS) + 1):
        sheet[f"D{r}"] = f"=C{r}*1.13"  # a formula: its cached value is what Excel shows
    for i in range(extra_rows):
        sheet.append([f"X{i}", "1GB", i])
    second = book.create_sheet("联系人")
    second.append(["姓名", "电话"])
    second.append(["张三", "13800000000"])
    book.save(path)
    return path


PPTX_SLIDES = [
    ("季度汇报", "本季度营收增长百分之二十", "讲者备注：先讲营收"),
    ("下季度计划", "扩大华东区域的销售团队", ""),
]


def make_pptx(path: Path) -> Path:
    import pptx
    from pptx.util import Inches

    deck = pptx.Presentation()
    for title, body, notes in PPTX_SLIDES:
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = title
        slide.placeholders[1].text = body
        if notes:
            slide.notes_slide.notes_text_frame.text = notes
    table = deck.slides[1].shapes.add_table(2, 2, Inches(1), Inches(4), Inches(4), Inches(1)).table
    for (r, c), value in {(0, 0): "区域", (0, 1): "目标人数", (1, 0): "华东", (1, 1): "30"}.items():
        table.cell(r, c).text = value
    deck.save(path)
    return path


EPUB_CHAPTERS = [("第一章 安装", "使用 pip 安装知库，然后运行初始化脚本。"), ("第二章 配置", "配置文件位于主目录下的 config.toml 中。")]


def make_epub(path: Path) -> Path:
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("zhiku-test")
    book.set_title("知库手册")
    book.set_language("zh")
    chapters = []
    for i, (title, body) in enumerate(EPUB_CHAPTERS, 1):
        chapter = epub.EpubHtml(title=title, file_name=f"chap_{i}.xhtml", lang="zh")
        chapter.content = f"<html><body><p>{body}</p></body></html>"
        book.add_item(chapter)
        chapters.append(chapter)
    book.toc = chapters
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = ["nav", *chapters]
    epub.write_epub(str(path), book)
    return path


HTML_TITLE = "关于调整春节放假安排的通知"
HTML_ARTICLE = [
    "各部门、各单位：根据国务院办公厅通知精神，现将二〇二七年春节放假安排通知如下。",
    "二月五日至十一日放假调休，共七天。二月四日（星期日）、二月十三日（星期六）上班。",
    "节假日期间，各部门要妥善安排好值班和安全保卫等工作，遇有重大突发事件，要按规定及时报告并妥善处置。",
    "请各部门提前做好工作安排，确保节后各项工作顺利开展，放假期间注意人身和财产安全。",
]
HTML_JUNK = ["网站首页", "机构设置", "政务公开", "版权所有：某某市人民政府办公室", "猜你喜欢", "市长信箱"]


def make_html(path: Path, encoding: str = "gb2312") -> Path:
    nav = "".join(f'<li><a href="/{i}">{item}</a></li>' for i, item in enumerate(HTML_JUNK[:3]))
    article = "".join(f"<p>{p}</p>" for p in HTML_ARTICLE)
    related = "".join(f'<li><a href="/r{i}">{t}</a></li>' for i, t in enumerate(["2026年国庆放假通知", "2025年春节放假通知"]))
    page = f"""<!DOCTYPE html>
<html><head><meta http-equiv="Content-Type" content="text/html; charset={encoding}">
<title>{HTML_TITLE}</title><script>var tracker = "统计代码";</script><style>.nav {{color: red}}</style></head>
<body>
<header><div class="logo">某某市人民政府</div><nav class="nav"><ul>{nav}</ul></nav></header>
<div class="crumb">当前位置：首页 &gt; 政务公开 &gt; 通知公告</div>
<main><article><h1>{HTML_TITLE}</h1>{article}</article></main>
<aside><h3>{HTML_JUNK[4]}</h3><ul>{related}</ul></aside>
<footer><p>{HTML_JUNK[3]}</p><p><a href="/mail">{HTML_JUNK[5]}</a></p></footer>
</body></html>"""
    path.write_bytes(page.encode("gb18030" if encoding == "gb2312" else encoding))
    return path


CSV_ROWS = [["城市", "常住人口（万）", "面积（平方公里）"], ["北京", "2189", "16410"], ["上海", "2487", "6340"]]


def make_csv(path: Path, delimiter: str = ",", encoding: str = "gbk") -> Path:
    path.write_bytes("\n".join(delimiter.join(row) for row in CSV_ROWS).encode(encoding))
    return path


JSON_RECORDS = [
    {"问题": "如何重置密码", "答案": "在登录页点击忘记密码", "标签": ["账号", "安全"], "元数据": {"作者": "客服部"}},
    {"问题": "发票多久开具", "答案": "订单完成后三个工作日内", "标签": ["财务"], "元数据": {"作者": "财务部"}},
]


def make_json(path: Path) -> Path:
    path.write_text(json.dumps(JSON_RECORDS, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def make_jsonl(path: Path) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in JSON_RECORDS) + "\n", encoding="utf-8")
    return path


# ---- broken files


def make_encrypted_office(path: Path) -> Path:
    """What Office writes for a password-protected .docx/.xlsx/.pptx: an OLE compound file."""
    path.write_bytes(OLE_MAGIC + b"\x00" * 504 + b"EncryptedPackage" + b"\x00" * 1000)
    return path


def make_truncated_zip(path: Path, good: Path) -> Path:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def make_zip_without_parts(path: Path) -> Path:
    """A valid zip that is no Office document (no [Content_Types].xml)."""
    with zipfile.ZipFile(path, "w") as package:
        package.writestr("hello.txt", "不是 Office 文件")
    return path


def make_drm_epub(path: Path, good: Path) -> Path:
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            target.writestr(item, source.read(item.filename))
        target.writestr("META-INF/encryption.xml", '<encryption><EncryptedData><CipherData/></EncryptedData></encryption>')
    return path


# ---- images and scans (rendered from known text)

OCR_LINES = ["关于开展年度安全检查的通知", "各部门：为保障生产安全，公司决定于下月开展年度安全检查。", "请各部门认真自查，并于本月底前提交自查报告。"]


def cjk_font_available() -> bool:
    """Rendering a page of Chinese needs a CJK font on the machine (pdfium falls back to the system's)."""
    import shutil
    import subprocess

    if shutil.which("fc-list") is None:
        return False
    return bool(subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout.strip())


def render_pdf_page(pdf: Path, page: int = 0, dpi: int = 200):
    """A PIL image of one page, as a scanner would have made it."""
    import pypdfium2

    document = pypdfium2.PdfDocument(pdf)
    try:
        return document[page].render(scale=dpi / 72).to_pil().convert("RGB")
    finally:
        document.close()


def make_text_image(path: Path, lines=OCR_LINES, work: Path | None = None) -> Path:
    """An image of a printed page holding ``lines`` (reportlab's STSong-Light, rendered by pdfium)."""
    from tests.fixtures import make_chinese_pdf

    pdf = make_chinese_pdf((work or path.parent) / f".{path.stem}-source.pdf", pages=[lines], header=None, footer=None)
    render_pdf_page(pdf).save(path)
    pdf.unlink()
    return path


def make_scanned_pdf(path: Path, pages_lines, work: Path | None = None) -> Path:
    """A PDF whose pages are images of text only (no text layer), like a scan."""
    from tests.fixtures import make_chinese_pdf

    images = []
    for i, lines in enumerate(pages_lines):
        source = make_chinese_pdf((work or path.parent) / f".{path.stem}-{i}.pdf", pages=[lines], header=None, footer=None)
        images.append(render_pdf_page(source))
        source.unlink()
    images[0].save(path, "PDF", resolution=200.0, save_all=True, append_images=images[1:])
    return path
