"""Reading order on PDF pages set in columns.

pdfplumber reads a page line by line across its full width, so a page set in two
or three columns (the Federal Register, papers, newsletters) comes out with every
line stitched from unrelated sentences. Here a page's columns are found from its
gutters — vertical strips that almost no line of text crosses — and each column
is read top to bottom before the next. Lines that cross a gutter (running heads,
titles, full-width figures' captions) split the page into bands read in order;
text set sideways in the margins comes last.

A page is only treated as columns when each column reads like prose: tables and
transcripts with a column of line numbers keep pdfplumber's own order.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import partial

# A gutter is at least this wide (points) and crossed by at most this share of the lines.
MIN_GUTTER_WIDTH = 6.0
MAX_GUTTER_CROSSING_SHARE = 0.06
# Column detection needs this many lines of text on the page, and each column at least
# this share of the text's width and this many characters per line on average (prose).
MIN_LINES = 12
MIN_COLUMN_WIDTH_SHARE = 0.18
MIN_CHARACTERS_PER_COLUMN_LINE = 14
LINE_TOLERANCE = 3.0  # words whose tops differ by less than this (points) share a line
MAX_WORD_GAP = 4.0  # points between two words of one stretch of text (a gutter is wider)


@dataclass(frozen=True)
class _Line:
    top: float
    bottom: float
    words: tuple[dict, ...]


def reading_order_text(page) -> str:
    """The page's text, column by column where the page is set in columns."""
    lines = _lines(page.extract_words())
    columns = _columns(lines)
    if len(columns) < 2:
        return page.extract_text() or ""
    # Regions partition the page, and each character goes to the one holding its centre:
    # nothing is read twice or lost between regions.
    x_cuts = [-math.inf] + [(a[1] + b[0]) / 2 for a, b in zip(columns, columns[1:])] + [math.inf]
    bands = _bands(lines, columns)
    # bands can overlap (a tall table cell): cuts never go back up, so regions never overlap
    y_cuts = [-math.inf] + list(itertools.accumulate(((a[1] + b[0]) / 2 for a, b in zip(bands, bands[1:])), max)) + [math.inf]
    parts = []
    for (top, bottom), (_, _, spanning) in zip(zip(y_cuts, y_cuts[1:]), bands):
        for left, right in [(-math.inf, math.inf)] if spanning else zip(x_cuts, x_cuts[1:]):
            parts.append(page.filter(partial(_upright_within, left=left, right=right, top=top, bottom=bottom)))
    parts.append(page.filter(_sideways))  # margin notes set vertically would break into the lines they cross
    return "\n".join(text for text in (part.extract_text() or "" for part in parts) if text.strip())


def _upright_within(obj: dict, *, left: float, right: float, top: float, bottom: float) -> bool:
    if "x0" not in obj or "top" not in obj:
        return True
    x, y = (obj["x0"] + obj["x1"]) / 2, (obj["top"] + obj["bottom"]) / 2
    return obj.get("upright", True) and left <= x < right and top <= y < bottom


def _sideways(obj: dict) -> bool:
    return "x0" in obj and not obj.get("upright", True)


def _lines(words: list[dict]) -> list[_Line]:
    lines: list[list[dict]] = []
    for word in sorted(words, key=lambda w: (w["top"], w["x0"])):
        if lines and abs(word["top"] - lines[-1][0]["top"]) < LINE_TOLERANCE:
            lines[-1].append(word)
        else:
            lines.append([word])
    return [_Line(min(w["top"] for w in ws), max(w["bottom"] for w in ws), tuple(ws)) for ws in lines]


def _columns(lines: list[_Line]) -> list[tuple[float, float]]:
    """The page's columns as (left, right) x-ranges; one range or none when it is not set in columns."""
    if len(lines) < MIN_LINES:
        return []
    left = min(w["x0"] for line in lines for w in line.words)
    right = max(w["x1"] for line in lines for w in line.words)
    crossings = [0] * (int(right - left) + 1)
    for line in lines:
        covered = set()
        for word in line.words:
            covered.update(range(int(word["x0"] - left), int(word["x1"] - left) + 1))
        for x in covered:
            crossings[x] += 1
    limit = max(1, MAX_GUTTER_CROSSING_SHARE * len(lines))
    gutters = _runs([count <= limit for count in crossings], MIN_GUTTER_WIDTH)
    edges = [left] + [left + x for gutter in gutters for x in gutter] + [right]
    columns = list(zip(edges[::2], edges[1::2]))
    # a narrow strip at either edge (a margin note, a vertical stamp) joins its neighbour
    narrow = MIN_COLUMN_WIDTH_SHARE * (right - left)
    while len(columns) > 1 and columns[0][1] - columns[0][0] < narrow:
        columns[:2] = [(columns[0][0], columns[1][1])]
    while len(columns) > 1 and columns[-1][1] - columns[-1][0] < narrow:
        columns[-2:] = [(columns[-2][0], columns[-1][1])]
    if len(columns) < 2 or not all(_reads_like_prose(lines, column, right - left) for column in columns):
        return []
    return columns


def _runs(flags: list[bool], min_width: float) -> list[tuple[int, int]]:
    """Inner runs of True at least ``min_width`` long, as (start, end); runs touching either edge are margins."""
    runs, start = [], None
    for x, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = x
        elif not flag and start is not None:
            if start > 0 and x < len(flags) and x - start >= min_width:
                runs.append((start, x))
            start = None
    return runs


def _reads_like_prose(lines: list[_Line], column: tuple[float, float], text_width: float) -> bool:
    left, right = column
    if right - left < MIN_COLUMN_WIDTH_SHARE * text_width:
        return False
    per_line = [sum(len(w["text"]) for w in line.words if left <= w["x0"] and w["x1"] <= right) for line in lines]
    per_line = [n for n in per_line if n]
    return len(per_line) >= MIN_LINES / 2 and sum(per_line) / len(per_line) >= MIN_CHARACTERS_PER_COLUMN_LINE


def _bands(lines: list[_Line], columns: list[tuple[float, float]]):
    """(top, bottom, spanning) from the top of the page: a line crossing a gutter is its own spanning band;
    the lines between such lines form one band read column by column."""
    centres = [(a[1] + b[0]) / 2 for a, b in zip(columns, columns[1:])]
    bands: list[list] = []
    for line in lines:
        spanning = any(left <= centre <= right for left, right in _runs_of_text(line) for centre in centres)
        if bands and not spanning and not bands[-1][2]:
            bands[-1][1] = line.bottom
        else:
            bands.append([line.top, line.bottom, spanning])
    return [tuple(band) for band in bands]


def _runs_of_text(line: _Line) -> list[tuple[float, float]]:
    """The line's stretches of text, words closer than a wide space joined: a running head crosses
    a gutter's centre; a column's justified line that only nicks the gutter's edge does not."""
    runs: list[list[float]] = []
    for word in sorted(line.words, key=lambda w: w["x0"]):
        if runs and word["x0"] - runs[-1][1] <= MAX_WORD_GAP:
            runs[-1][1] = max(runs[-1][1], word["x1"])
        else:
            runs.append([word["x0"], word["x1"]])
    return [(left, right) for left, right in runs]
