"""E-books (.epub): chapters in reading order, each under its title.

    load_epub(Path("手册.epub")) -> [Page(None, "# 第一章 安装\\n\\n…\\n\\n# 第二章 配置\\n\\n…")]

The spine gives the reading order; a chapter's title is its table-of-contents
entry, else its first heading. A DRM-protected book (``META-INF/encryption.xml``
names encrypted chapters) or a damaged one is an IngestError naming the reason.
"""

from __future__ import annotations

import posixpath
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ingest.documents import IngestError, Page
from ingest.packages import open_package, read_package
from ingest.webpages import element_text, parse_html

ENCRYPTION_MANIFEST = "META-INF/encryption.xml"


def load_epub(path: Path) -> list[Page]:
    from ebooklib import epub

    book = open_package(path, ".epub", _read_book)
    return [Page(None, read_package(path, ".epub", lambda: "\n\n".join(_chapters(book, epub))))]


def _read_book(path: Path):
    from ebooklib import epub

    with zipfile.ZipFile(path) as package:
        if ENCRYPTION_MANIFEST in package.namelist() and b"EncryptedData" in package.read(ENCRYPTION_MANIFEST):
            raise IngestError(path, "encrypted (DRM-protected e-book)")
    return epub.read_epub(str(path), options={"ignore_ncx": False})


def _chapters(book, epub) -> Iterator[str]:
    titles = dict(_toc_titles(book.toc))
    for item_id, _linear in book.spine:
        item = book.get_item_with_id(item_id)
        if item is None or not isinstance(item, epub.EpubHtml) or isinstance(item, epub.EpubNav):
            continue  # the navigation document repeats the table of contents
        root = parse_html(item.get_content(), item.get_name())
        text = element_text(root)
        title = titles.get(item.get_name())
        if title and not text.lstrip("# ").startswith(title):
            text = f"# {title}\n\n{text}"
        if text.strip():
            yield text


def _toc_titles(toc) -> Iterator[tuple[str, str]]:
    """(chapter file, title) for every entry of a (nested) table of contents, first entry per file winning."""
    for entry in reversed(list(_flatten(toc))):
        href = getattr(entry, "href", None)
        title = " ".join((getattr(entry, "title", None) or "").split())
        if href and title:
            yield posixpath.normpath(href.split("#", 1)[0]), title


def _flatten(toc) -> Iterator:
    for entry in toc:
        if isinstance(entry, (tuple, list)):
            section, children = entry[0], entry[1]
            yield section
            yield from _flatten(children)
        else:
            yield entry
