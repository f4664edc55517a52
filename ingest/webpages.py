"""Saved web pages (.html, .htm): the article, not the site around it.

    load_html(Path("通知.html")) -> [Page(None, "# 关于调整作息时间的通知\\n\\n各部门：…")]

The main content is found by trafilatura (navigation, menus, footers, comment
sections and "related articles" lists are left out; tables kept), the
``<title>`` becomes the first heading. When trafilatura finds no main content
(a page that is all content, e.g. a short exported note), the visible text of
the body is used without the page's navigation, header, footer and scripts.

The encoding is the page's own declaration (``<meta charset>``, the ``http-equiv``
form, or an XHTML file's ``<?xml … encoding=…?>``) when it decodes the bytes, else
detection as for text files.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from ingest.documents import IngestError, Page
from ingest.text import decode_text, read_bytes

_DECLARED_CHARSET = re.compile(
    rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)|^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9_.:-]+)""", re.I
)
# Once decoded, an XHTML page's own encoding declaration is stale, and lxml refuses text that carries one.
_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")
_DECLARATION_WINDOW = 4096
_GB_NAMES = {"gb2312", "gbk", "gb18030", "x-gbk", "cp936", "euc-cn"}
# Never text, wherever they appear.
_INVISIBLE = ("script", "style", "noscript", "template", "svg", "iframe", "head")
# Site furniture, dropped by the fallback extraction.
SITE_FURNITURE = ("nav", "header", "footer", "aside", "form", "menu")
# What starts a paragraph, and what only starts a line.
_PARAGRAPHS = {"p", "div", "section", "article", "main", "pre", "blockquote", "table", "ul", "ol", "dl", "figure"}
_LINES = {"li", "tr", "br", "dd", "dt"}
_CELLS = {"td", "th"}
_HEADINGS = {f"h{n}": n for n in range(1, 7)}


def load_html(path: Path) -> list[Page]:
    markup = decode_html(read_bytes(path), path)
    root = parse_html(markup, path)
    title = page_title(root)
    body = _main_content(markup) or element_text(root, drop=SITE_FURNITURE)
    if title and not body.lstrip("# ").startswith(title):
        body = f"# {title}\n\n{body}"
    return [Page(None, body)]


def decode_html(data: bytes, path: Path | str) -> str:
    """The page's text in its declared charset (GB2312/GBK read as GB18030), else as detected."""
    return _XML_DECLARATION.sub("", _decoded(data, path), count=1)


def _decoded(data: bytes, path: Path | str) -> str:
    declared = _DECLARED_CHARSET.search(data[:_DECLARATION_WINDOW])
    if declared:
        charset = (declared.group(1) or declared.group(2)).decode("ascii").lower()
        try:
            return data.decode("gb18030" if charset in _GB_NAMES else charset)
        except (LookupError, UnicodeDecodeError):
            pass  # a wrong or unknown declaration: detect instead
    return decode_text(data, path)


def parse_html(markup: str | bytes, path: Path | str):
    """The lxml tree of a page (bytes: an XHTML file with its own XML encoding declaration)."""
    import lxml.etree
    import lxml.html

    try:
        return lxml.html.document_fromstring(markup)
    except (lxml.etree.ParserError, ValueError) as exc:
        raise IngestError(path, f"not an HTML page ({exc})") from None


def page_title(root) -> str:
    titles = root.xpath("//title")
    return " ".join(titles[0].text_content().split()) if titles else ""


def _main_content(markup: str) -> str:
    import trafilatura

    text = trafilatura.extract(
        markup, include_tables=True, include_comments=False, include_formatting=True, include_links=False,
        include_images=False, output_format="markdown", deduplicate=False,
    )  # fmt: skip
    return (text or "").strip()


def element_text(root, drop: tuple[str, ...] = ()) -> str:
    """The visible text under ``root``: one line per block element, headings as Markdown
    headings, ``drop``'s elements (and scripts, styles) left out."""
    for element in root.iter(*_INVISIBLE, *drop):
        if element.getparent() is not None:
            element.drop_tree()
    lines = [" ".join(line.split()) for line in "".join(_walk(root)).split("\n")]
    paragraphs, current = [], []
    for line in lines:
        if line:
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return "\n\n".join(paragraphs)


def _walk(element) -> Iterator[str]:
    tag = element.tag if isinstance(element.tag, str) else ""
    level = _HEADINGS.get(tag)
    if level:
        text = " ".join(element.text_content().split())
        if text:
            yield f"\n\n{'#' * level} {text}\n\n"
    else:
        brk = "\n\n" if tag in _PARAGRAPHS else "\n" if tag in _LINES else " " if tag in _CELLS else ""
        yield brk
        if element.text:
            yield element.text
        for child in element:
            yield from _walk(child)
        yield brk
    if element.tail:
        yield element.tail
