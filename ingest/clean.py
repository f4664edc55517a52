"""Turn raw extracted text into clean text worth indexing.

Small pure functions, composed by :func:`clean_document`:

1. :func:`remove_pdf_artifacts` - ``(cid:123)`` glyph placeholders from pdfminer.
2. :func:`fix_numeric_entities` - ``&#xff08;`` and the mangled ``#xff08;`` left by scrapers.
3. :func:`normalize_unicode` - NFKC (Kangxi radicals ⽂ → 文, full-width ``ＡＢＣ１２３`` → ``ABC123``),
   keeping the full-width punctuation of Chinese prose (，！？；：（）) as it is.
4. :func:`normalize_whitespace` - line endings, tabs, NBSP, zero-width characters,
   control characters, trailing spaces, runs of spaces and of blank lines.
5. :func:`remove_repeated_edge_lines` - running headers and footers: lines in the first or
   last few lines of many pages once digits are normalised ("4 / 57", "第 3 页", a title).
6. :func:`remove_boilerplate` - runs of page-number lines ("- 1", "- 2", ...), navigation
   crumbs ("当前位置: 首页 > news >正文"), "相关文章" link lists, bullet-only lines.
7. :func:`join_broken_lines` - re-join lines that layout broke inside a sentence: no space
   between CJK characters, one space between English words, hyphenated words re-joined;
   paragraph breaks, list items, headings, tables and code blocks stay on their own lines.

Fenced code blocks (```` ``` ```` / ``~~~``) and YAML front matter are never joined or
treated as boilerplate.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

from ingest.documents import CleanedDocument, LoadedDocument

# ------------------------------------------------------------------ characters

_CJK_RANGES = (
    (0x2E80, 0x2FDF),  # CJK and Kangxi radicals
    (0x3000, 0x303F),  # CJK symbols and punctuation
    (0x3040, 0x30FF),  # kana
    (0x3100, 0x312F),  # bopomofo
    (0x31C0, 0x31FF),  # CJK strokes, katakana extension
    (0x3400, 0x4DBF),  # extension A
    (0x4E00, 0x9FFF),  # unified ideographs
    (0xF900, 0xFAFF),  # compatibility ideographs
    (0xFE30, 0xFE4F),  # CJK compatibility forms
    (0xFF00, 0xFFEF),  # full-width forms
    (0x20000, 0x323AF),  # extensions B-H
)


def is_cjk(ch: str) -> bool:
    """True for Chinese/Japanese characters and CJK punctuation (not Hangul: Korean uses spaces)."""
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def _display_width(line: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in line)


# ------------------------------------------------------------------ 1-3: characters


_CID = re.compile(r"\(cid:\d+\)")


def remove_pdf_artifacts(text: str) -> str:
    """Drop pdfminer's ``(cid:N)`` placeholders for glyphs without a Unicode mapping.

    >>> remove_pdf_artifacts("第 ›Ÿ˜(cid:1) 号")
    '第 ›Ÿ˜ 号'
    """
    return _CID.sub("", text)


_ENTITY = re.compile(r"&#[xX]([0-9a-fA-F]{1,6});|&#(\d{1,7});|(?<!&)#[xX]([0-9a-fA-F]{2,6});")


def fix_numeric_entities(text: str) -> str:
    """Decode numeric character references, including the ``#xff08;`` form scrapers leave
    when they strip the ``&`` (only for non-ASCII code points, so ``#x41;`` in code stays).

    >>> fix_numeric_entities("单机单卡#xff08;一台机器#xff09;&#20013;")
    '单机单卡（一台机器）中'
    """

    def decode(match: re.Match[str]) -> str:
        hex_full, dec, hex_bare = match.groups()
        code = int(hex_full or hex_bare, 16) if (hex_full or hex_bare) else int(dec)
        if hex_bare and code < 0x80:
            return match.group(0)
        if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            return match.group(0)
        return chr(code)

    if "#" not in text:
        return text
    return _ENTITY.sub(decode, text)


# Full-width punctuation that is the normal form in Chinese prose: NFKC would turn
# "，" into "," and "（" into "(", so it is left alone (full-width letters and digits
# are still folded to ASCII).
KEEP_FULLWIDTH = "，！？；：（）"
_KEEP_SPLIT = re.compile(f"([{KEEP_FULLWIDTH}])")


def normalize_unicode(text: str) -> str:
    """NFKC, except for the Chinese full-width punctuation in :data:`KEEP_FULLWIDTH`.

    >>> normalize_unicode("⽂本⼀致，ＡＢＣ１２３！")
    '文本一致，ABC123！'
    """
    if text.isascii():
        return text
    parts = _KEEP_SPLIT.split(text)
    return "".join(part if i % 2 else unicodedata.normalize("NFKC", part) for i, part in enumerate(parts))


_SPACES = dict.fromkeys(map(ord, "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"), " ")
_INVISIBLE = dict.fromkeys(
    map(ord, "\u00ad\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\ufeff"),
    None,
)
_LINE_BREAKS = {ord("\v"): "\n", ord("\f"): "\n\n", ord("\x85"): "\n", ord("\u2028"): "\n", ord("\u2029"): "\n\n"}
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_LEADING_TABS = re.compile(r"^[ \t]+", re.M)
_INNER_SPACES = re.compile(r"(?<=\S) {2,}(?=\S)")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Normalise line endings and spaces; keep indentation and single blank lines.

    \\r\\n and \\r become \\n; NBSP and other spaces become " "; zero-width characters,
    soft hyphens and control characters go; tabs become spaces (4 per leading tab);
    trailing spaces go; runs of spaces inside a line (outside code blocks) become one;
    three or more newlines become a blank line; leading/trailing blank lines go.

    >>> normalize_whitespace("第一行\\u200b  \\r\\n\\r\\n\\r\\n\\t缩进\\u00a0文字   ")
    '第一行\\n\\n    缩进 文字'
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_LINE_BREAKS).translate(_SPACES).translate(_INVISIBLE)
    if "\t" in text:
        text = _LEADING_TABS.sub(lambda m: m.group(0).replace("\t", "    "), text).replace("\t", " ")
    text = _CONTROLS.sub("", text)
    lines = [line.rstrip() for line in text.split("\n")]
    code = _code_mask(lines)
    lines = [line if code[i] else _INNER_SPACES.sub(" ", line) for i, line in enumerate(lines)]
    text = _BLANK_RUNS.sub("\n\n", "\n".join(lines))
    return text.strip("\n")


# ------------------------------------------------------------------ structure helpers

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _code_mask(lines: list[str]) -> list[bool]:
    """True for lines inside (or delimiting) fenced code blocks and YAML front matter."""
    mask = [False] * len(lines)
    start = 0
    if lines and lines[0].strip() == "---":
        for j in range(1, min(len(lines), 60)):
            if lines[j].strip() in ("---", "..."):
                for k in range(j + 1):
                    mask[k] = True
                start = j + 1
                break
    fence = ""
    for i in range(start, len(lines)):
        match = _FENCE.match(lines[i])
        if fence:
            mask[i] = True
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = ""
        elif match:
            mask[i] = True
            fence = match.group(1)
    return mask


_LIST_ITEM = re.compile(
    r"^\s*(?:[-*+•·●○■□▪◦◆◇▶►➢✓✔]\s+"  # bullets
    r"|\d{1,3}(?:[.．)]\s+|、)"  # "1. " "1) " "1、" (not "2.5e-5")
    r"|[(（]\s*(?:\d{1,3}|[a-zA-Z]|[一二三四五六七八九十]{1,3})\s*[)）]"  # (1) （一）
    r"|[一二三四五六七八九十百]{1,3}[、.．]"  # 一、
    r"|[a-zA-Z][.)]\s+"  # a. b)
    r"|[①②③④⑤⑥⑦⑧⑨⑩⑪⑫⑬⑭⑮⑯⑰⑱⑲⑳]"
    r"|第[一二三四五六七八九十百\d]+[章节条部分篇]"
    r"|(?:Step|步骤)\s*\d+"
    r")"
)
_STRUCTURAL = re.compile(r"^\s*(?:#{1,6}\s|\||>|<[a-zA-Z/!]|(?:-{3,}|\*{3,}|_{3,})\s*$)|^ {4,}")


def is_list_item(line: str) -> bool:
    """A list item or a numbered heading: "- a", "1. a", "（1）a", "一、a", "第二章 a", "Step 3 a"."""
    return bool(_LIST_ITEM.match(line))


def _is_structural(line: str) -> bool:
    """Lines that always start a new line: list items, Markdown headings, table rows,
    quotes, HTML, horizontal rules, indented code."""
    return bool(_STRUCTURAL.match(line)) or is_list_item(line)


# ------------------------------------------------------------------ 5: headers / footers


def _edge_key(line: str) -> str:
    """Digits normalised, and a page number at either end ignored: "47700 Federal Register"
    and "Federal Register 47701" are the same running header."""
    key = re.sub(r"\s+", " ", re.sub(r"\d+", "#", line.strip().lower()))
    return key.strip("# ") or key


def remove_repeated_edge_lines(pages: list[str], edge: int = 3, min_share: float = 0.3) -> list[str]:
    """Drop running headers/footers: a line among the first or last ``edge`` non-blank
    lines of a page (at most a third of its lines) whose digit-normalised form
    ("4 / 57" → "# / #", a page number at either end ignored) appears in that zone on at
    least ``min_share`` of the pages (and on at least 2 pages; 3 when the document has
    4 pages or more). Repeated until nothing changes (at most 8 rounds), so footers
    several lines deep go too.

    >>> pages = [f"知库手册\\n{body}\\n{i} / 3" for i, body in enumerate(["甲。", "乙。", "丙。"], 1)]
    >>> remove_repeated_edge_lines(pages)
    ['甲。', '乙。', '丙。']
    """
    if len(pages) < 2:
        return list(pages)
    # Footers can be several lines deep; each round peels the repeated edge lines off,
    # so the next round sees the lines beneath them at the edge.
    # A line found repeated in one round stays a running line in the next: on a short page
    # it may only reach the edge once the lines beneath it are gone.
    running: set[str] = set()
    for _ in range(8):
        cleaned = _remove_edge_lines_once(pages, edge, min_share, running)
        if cleaned == pages:
            break
        pages = cleaned
    return list(pages)


def _remove_edge_lines_once(pages: list[str], edge: int, min_share: float, running: set[str]) -> list[str]:
    """One round; ``running`` (the keys of lines found repeated so far) grows with this round's."""
    min_pages = max(2 if len(pages) < 4 else 3, math.ceil(min_share * len(pages)))
    zones: list[list[int]] = []
    counts: Counter[str] = Counter()
    split_pages = [page.split("\n") for page in pages]
    for lines in split_pages:
        nonblank = [i for i, line in enumerate(lines) if line.strip()]
        k = max(1, min(edge, len(nonblank) // 3))
        zone = sorted(set(nonblank[:k] + nonblank[-k:]))
        zones.append(zone)
        counts.update({_edge_key(lines[i]) for i in zone})
    running.update(key for key, n in counts.items() if n >= min_pages and key)
    if not running:
        return list(pages)
    cleaned = []
    for lines, zone in zip(split_pages, zones):
        drop = {i for i in zone if _edge_key(lines[i]) in running}
        kept = [line for i, line in enumerate(lines) if i not in drop]
        cleaned.append(_BLANK_RUNS.sub("\n\n", "\n".join(kept)).strip("\n"))
    return cleaned


# ------------------------------------------------------------------ 6: boilerplate

PAGE_NUMBER_LINE = re.compile(
    r"^\s*(?:[-–—•·*]\s*)?"
    r"(?:(?:page|p\.)\s*)?(?:第\s*)?(\d{1,5})\s*(?:页|頁)?"
    r"(?:\s*(?:/|of|共)\s*\d{1,5}\s*(?:页|頁)?)?"
    r"\s*[-–—]?\s*$",
    re.I,
)
_PAGINATION_GAP = re.compile(r"^\s*(?:[-–—•·*]\s*)?(?:\.{2,}|…+)\s*$")
_PAGINATION_TOTAL = re.compile(r"^\s*(?:共|total:?)\s*\d+\s*(?:条|页|頁|篇|项|条记录|items?|pages?|results?)?\s*$", re.I)
_BULLET_ONLY = re.compile(r"^\s*[-–—•·*●○■□▪◦]\s*$")
_CRUMB = re.compile(
    r"^\s*(?:当前位置|您的位置|你的位置|您现在的位置|你现在的位置|当前的位置|所在位置)\s*[:：]"
    r"|^\s*(?:首页|主页|网站首页|Home)\s*(?:>|»|›|＞|→)\s*\S",
)
_RELATED_HEADING = re.compile(
    r"^\s*(?:#{1,6}\s*)?(?:\*\*)?"
    r"(?:相关文章|相关推荐|相关阅读|相关链接|推荐文章|推荐阅读|热门文章|热门推荐|猜你喜欢|延伸阅读|最新文章|精彩推荐|"
    r"related (?:articles|posts|reading|links)|you (?:may|might) also like|recommended(?: articles| posts| reading)?)"
    r"(?:\*\*)?\s*[:：]?\s*$",
    re.I,
)
_SENTENCE_PUNCT = re.compile(r"[。！？!?；]")
_SCRAPED_BULLET = re.compile(r"^\s*[•●▪◦·]\s*\S")
_ANY_PUNCT = re.compile(r"[，。！？；：、,;:!?]")

# A run of page-number lines is removed when it is at least this long...
MIN_PAGE_NUMBER_RUN = 3
# ...and this share of neighbours count up by 0 or 1 ("- 3332", "- 3333", "- 3333").
MIN_SEQUENTIAL_SHARE = 0.7
# A trailing list of scraped "•" links with no heading is removed from this length on.
MIN_TRAILING_LINK_LIST = 8


def is_page_number_line(line: str) -> bool:
    """"- 12", "12", "第 3 页", "3 / 57", "Page 3 of 57", "- 4 -"."""
    return bool(PAGE_NUMBER_LINE.match(line))


def is_navigation_line(line: str) -> bool:
    """Breadcrumbs: "当前位置: 首页 > news >正文", "首页 > 新闻 > 正文"."""
    return bool(_CRUMB.match(line)) and len(line.strip()) <= 120


def is_related_heading(line: str) -> bool:
    """Headings that introduce lists of other articles: "相关文章:", "推荐文章", "Related posts"."""
    return bool(_RELATED_HEADING.match(line))


def _is_link_item(line: str) -> bool:
    stripped = line.strip()
    return 0 < len(stripped) <= 80 and not _SENTENCE_PUNCT.search(stripped) and not stripped.startswith("#")


def _page_number_runs(lines: list[str], code: list[bool]) -> set[int]:
    """Lines of runs of page-number lines counting up, with their pagination ellipses
    ("- ...") and a total just before or after ("共100000条")."""
    drop: set[int] = set()
    i = 0
    while i < len(lines):
        if code[i] or not (is_page_number_line(lines[i]) or _PAGINATION_GAP.match(lines[i])):
            i += 1
            continue
        run = [i]
        j = i + 1
        while j < len(lines) and not code[j]:
            line = lines[j]
            if line.strip() and not is_page_number_line(line) and not _PAGINATION_GAP.match(line):
                break
            if line.strip():
                run.append(j)
            j += 1
        numbers = [int(m.group(1)) for m in map(PAGE_NUMBER_LINE.match, (lines[k] for k in run)) if m]
        steps = [b - a for a, b in zip(numbers, numbers[1:])]
        if len(numbers) >= MIN_PAGE_NUMBER_RUN and sum(1 for s in steps if s in (0, 1)) >= MIN_SEQUENTIAL_SHARE * len(steps):
            drop.update(run)
            for k in (_neighbour(lines, run[0], -1), _neighbour(lines, run[-1], +1)):
                if k is not None and not code[k] and _PAGINATION_TOTAL.match(lines[k]):
                    drop.add(k)
        i = j
    return drop


def _neighbour(lines: list[str], index: int, step: int) -> int | None:
    k = index + step
    while 0 <= k < len(lines) and not lines[k].strip():
        k += step
    return k if 0 <= k < len(lines) else None


def remove_boilerplate(text: str) -> str:
    """Remove junk lines that carry no content (outside code blocks):

    - runs of ≥ 3 page-number lines counting up ("- 1", "- 2", ... from scraped PDFs),
      with their ellipses ("- ...") and a total next to them ("共100000条");
    - navigation crumbs ("当前位置: 首页 > news >正文");
    - a "相关文章"/"推荐文章"/"Related posts" heading and the short lines listed under it;
    - a trailing run of ≥ 8 short "•" items without punctuation (scraped link lists);
    - lines holding only a bullet or dash ("-"), which become paragraph breaks.

    Short list items inside an article are kept: a link list needs its heading, or
    must be a long "•" run at the very end of the text.

    >>> remove_boilerplate("正文。\\n- 1\\n- 2\\n- 3\\n相关文章:\\n  • 网站建设公司\\n  • 域名注册")
    '正文。'
    """
    lines = text.split("\n")
    code = _code_mask(lines)
    drop = _page_number_runs(lines, code)
    blank: set[int] = set()
    i = 0
    while i < len(lines):
        line = lines[i]
        if code[i]:
            i += 1
            continue
        if _BULLET_ONLY.match(line):
            blank.add(i)
        elif is_navigation_line(line):
            drop.add(i)
        elif is_related_heading(line):
            drop.add(i)
            j = i + 1
            while j < len(lines) and not code[j] and (not lines[j].strip() or _is_link_item(lines[j])):
                drop.add(j)
                j += 1
            i = j
            continue
        i += 1
    # a trailing list of scraped "•" links, no heading
    tail = [k for k in range(len(lines)) if lines[k].strip() and k not in drop]
    run: list[int] = []
    for k in reversed(tail):
        line = lines[k]
        if not code[k] and _SCRAPED_BULLET.match(line) and len(line.strip()) <= 60 and not _ANY_PUNCT.search(line):
            run.append(k)
        else:
            break
    if len(run) >= MIN_TRAILING_LINK_LIST:
        drop.update(run)
    kept = ["" if k in blank else line for k, line in enumerate(lines) if k not in drop or line == PAGE_BREAK]
    return _BLANK_RUNS.sub("\n\n", "\n".join(kept)).strip("\n")


# Marks page boundaries while boilerplate is removed from a whole document at once (so
# that a page-number run continuing on the next page is seen as one run). Form feeds
# never survive normalize_whitespace, and strip() treats the mark as blank.
PAGE_BREAK = "\f"


def remove_boilerplate_pages(pages: list[str]) -> list[str]:
    """:func:`remove_boilerplate` over the pages of one document taken together."""
    joined = f"\n{PAGE_BREAK}\n".join(pages)
    parts = remove_boilerplate(joined).split(PAGE_BREAK)
    assert len(parts) == len(pages), "page marks are never removed"
    return [_BLANK_RUNS.sub("\n\n", part).strip("\n") for part in parts]


# ------------------------------------------------------------------ 7: line joining

_SENTENCE_END = "。！？；：…!?"  # a line ending with these keeps its line break (CJK-style)
_NO_SPACE_AFTER = "-/$_=([{（【《“‘"
_NO_SPACE_BEFORE = "_.,;:!?)]}，。！？；：）】》”’、"
# English word halves in English context: inside Chinese text a line-final hyphen is part
# of an identifier ("例如sdxl-" + "diffusers。"), never a soft hyphen.
_HYPHEN_PREFIX = re.compile(r"(?:^|(?<=[\s\"'(“‘]))([A-Za-z][a-z]*)-$")
_HYPHEN_SUFFIX = re.compile(r"^([a-z]+)(?=$|[\s.,;:!?)\"'”’])")
_COMPOUND_PREFIXES = frozenset({"non", "self", "ex", "all", "well", "half", "cross", "anti", "multi", "semi"})
_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")


def build_vocabulary(texts: Iterable[str]) -> set[str]:
    """Lower-cased English words (and hyphenated compounds) of a document, used to decide
    whether "nose-\\ndown" keeps its hyphen and "erro-\\nneous" loses it."""
    vocabulary: set[str] = set()
    for text in texts:
        for word in _WORD.findall(text):
            vocabulary.add(word.lower())
    return vocabulary


# A line wider than this (CJK characters count 2) is a paragraph written on one line,
# not a line that layout wrapped: nothing is joined onto it.
MAX_WRAPPED_WIDTH = 300
_URL_START = re.compile(r"^(?:https?|ftp)://", re.I)


def _line_width_threshold(lines: list[str], code: list[bool]) -> float:
    """60 % of the typical width of lines that continue into a next line (the last line
    of a paragraph is short by nature, so it does not count); 0 with too few samples."""
    widths = sorted(
        _display_width(line.strip())
        for i, line in enumerate(lines[:-1])
        if line.strip() and lines[i + 1].strip() and not code[i]
    )
    if len(widths) < 2:
        return 0.0
    typical = widths[int(0.8 * (len(widths) - 1))]
    return 0.6 * typical


_NUMBER_TOKEN = re.compile(r"^[-+(]?[$€¥]?\d[\d,.:/%-]*\)?$")


def _is_tabular(line: str) -> bool:
    """A table row: at least 4 cells, half of them numbers ("Alabama 1,234 5 0 12")."""
    tokens = line.split()
    return len(tokens) >= 4 and sum(1 for t in tokens if _NUMBER_TOKEN.match(t)) * 2 >= len(tokens)


def _join_pair(prev: str, cur: str, vocabulary: set[str] | None) -> str:
    """``prev`` and ``cur`` (stripped of surrounding spaces) as one line."""
    last, first = prev[-1], cur[0]
    if last == "-" and len(prev) > 1 and first.isalnum():
        prefix = _HYPHEN_PREFIX.search(prev)
        suffix = _HYPHEN_SUFFIX.match(cur)
        if prefix and suffix:
            head, tail = prefix.group(1), suffix.group(1)
            joined, compound = (head + tail).lower(), f"{head}-{tail}".lower()
            if vocabulary is not None and joined in vocabulary:
                return prev[:-1] + cur
            if (vocabulary is not None and compound in vocabulary) or head.lower() in _COMPOUND_PREFIXES:
                return prev + cur  # "nose-" + "down", "non-" + "landing"
            return prev[:-1] + cur  # "erro-" + "neous" -> "erroneous"
        return prev + cur  # "Llama-" + "2-7b", "npu-" + "smi", "docker run -" + "itd"
    if _URL_START.match(cur):
        return prev + " " + cur
    if is_cjk(last) or is_cjk(first) or last in _NO_SPACE_AFTER or first in _NO_SPACE_BEFORE:
        return prev + cur
    return prev + " " + cur


def join_broken_lines(text: str, vocabulary: set[str] | None = None) -> str:
    """Re-join lines that layout broke inside a sentence.

    A line is joined to the previous one when both are non-blank text (not code, not a
    list item, heading, table row, quote or rule), the previous line does not end a
    sentence the Chinese way (。！？；：…), neither looks like a table row (half of its 4+
    cells numbers), and the previous line is long (at least 60 % of the text's typical
    line width, so titles and the last line of a paragraph keep their break, and at most
    :data:`MAX_WRAPPED_WIDTH`: a longer line is a whole paragraph). CJK on either side: joined without a space; English: one space;
    "hyphen-" + "ated": when both halves are plain lower-case word parts, the hyphen is
    dropped if ``vocabulary`` (the document's words) has "hyphenated", kept if it has
    "hyphen-ated" or the first half is a compound prefix ("non-", "self-"), else dropped;
    a hyphen inside a code-like token is always kept ("Llama-" + "2-7b", "npu-" + "smi").

    >>> join_broken_lines("检索增强生成把文档切成\\n片段，然后检索。\\n\\n- 列表项\\n- 另一项")
    '检索增强生成把文档切成片段，然后检索。\\n\\n- 列表项\\n- 另一项'
    >>> join_broken_lines("English words are joined with a\\nspace, and hyphen-\\nated words too.")
    'English words are joined with a space, and hyphenated words too.'
    """
    lines = text.split("\n")
    code = _code_mask(lines)
    min_width = _line_width_threshold(lines, code)
    out: list[str] = []
    out_code: list[bool] = []
    prev_width = 0
    for i, line in enumerate(lines):
        joinable = (
            out
            and not code[i]
            and not out_code[-1]
            and line.strip()
            and out[-1].strip()
            and not _is_structural(line)
            and not _STRUCTURAL.match(out[-1])
            and out[-1].rstrip()[-1] not in _SENTENCE_END
            and min_width <= prev_width <= MAX_WRAPPED_WIDTH
            and not (_is_tabular(line) or _is_tabular(out[-1]))
        )
        if joinable:
            out[-1] = _join_pair(out[-1].rstrip(), line.strip(), vocabulary)
        else:
            out.append(line)
            out_code.append(code[i])
        prev_width = _display_width(line.strip())
    return "\n".join(out)


# ------------------------------------------------------------------ composition


def _prepare(text: str) -> str:
    text = remove_pdf_artifacts(text)
    text = fix_numeric_entities(text)
    text = normalize_unicode(text)
    return normalize_whitespace(text)


def _finish(text: str, vocabulary: set[str] | None) -> str:
    text = join_broken_lines(text, vocabulary)
    return normalize_whitespace(text)


def clean_text(text: str, vocabulary: set[str] | None = None) -> str:
    """All cleaning steps on one text (no header/footer detection: that needs pages)."""
    prepared = remove_boilerplate(_prepare(text))
    return _finish(prepared, vocabulary if vocabulary is not None else build_vocabulary([prepared]))


PAGE_SEPARATOR = "\n\n"


def clean_document(doc: LoadedDocument) -> CleanedDocument:
    """Clean every page, drop headers/footers repeated across pages, and join the
    non-empty pages with a blank line, recording where each page starts."""
    prepared = [_prepare(page.text) for page in doc.pages]
    if len(prepared) > 1:
        prepared = remove_repeated_edge_lines(prepared)
    prepared = remove_boilerplate_pages(prepared)
    vocabulary = build_vocabulary(prepared)
    parts: list[str] = []
    page_starts: list[int] = []
    page_numbers: list[int] = []
    offset = 0
    for page, text in zip(doc.pages, prepared):
        text = _finish(text, vocabulary)
        if not text.strip():
            continue
        if parts:
            offset += len(PAGE_SEPARATOR)
        if page.number is not None:
            page_starts.append(offset)
            page_numbers.append(page.number)
        parts.append(text)
        offset += len(text)
    return CleanedDocument(doc.path, PAGE_SEPARATOR.join(parts), page_starts, page_numbers)
