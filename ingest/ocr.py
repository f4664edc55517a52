"""OCR of scans and images with RapidOCR (PP-OCRv4 Chinese/English models shipped in its wheel: offline).

    load_image(Path("通知.png"))   -> [Page(1, "关于…的通知\\n各部门：…", ocr=True)]
    read_image(pil_image)          -> "关于…的通知\\n各部门：…"

Recognised lines are put in reading order (top to bottom, left to right within
a line of text), one output line per line of text, with a blank line where the
vertical gap says a new paragraph starts; cleaning then joins the lines of a
paragraph as it does for PDF text.

The engine takes a while to load and holds its models in memory: it is made
once per process, on first use, in the process that parses files
(``ingest.worker``), so OCR overlaps the embedding done by the parent.

Each page read is reported on the ``zhiku.ocr`` logger with ``(path, done, total)`` as
its ``ocr_page`` attribute: :func:`ocr_pages_reported` turns that into a callback, and
the parsing process forwards it to its parent (OCR takes seconds a page on a CPU).
"""

from __future__ import annotations

import io
import logging
import statistics
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ingest.documents import IngestError, Page
from ingest.text import read_bytes

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
# Longer image sides are scaled down to this first: the detector works at about
# 1000-2000 pixels anyway, and a 10000-pixel photo would only cost time.
MAX_SIDE = 4000
# Recognised text below this confidence is noise (specks, table rules read as "一").
MIN_SCORE = 0.5
# A vertical gap larger than this many typical line heights starts a new paragraph.
PARAGRAPH_GAP = 0.9
# RapidOCR's 0°/180° line classifier turns about a third of the lines of an upright
# English page upside down (accuracy 0.57 with it, 1.00 without: bench.ocr); scans
# come upright far more often than upside down, so it stays off.
USE_ORIENTATION_CLASSIFIER = False

OCR_LOG = logging.getLogger("zhiku.ocr")

_engine = None
_engine_lock = threading.Lock()


def report_page(path: Path | str, done: int, total: int) -> None:
    """Say that page ``done`` of the ``total`` to OCR in ``path`` has been read."""
    OCR_LOG.info("OCR: page %d of %d of %s", done, total, path, extra={"ocr_page": (str(path), done, total)})


class _PageReports(logging.Handler):
    def __init__(self, callback: Callable[[str, int, int], None]):
        super().__init__(logging.INFO)
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        page = getattr(record, "ocr_page", None)
        if page is not None:
            self.callback(*page)


@contextmanager
def ocr_pages_reported(callback: Callable[[str, int, int], None]) -> Iterator[None]:
    """While inside, ``callback(path, done, total)`` after every page OCR reads."""
    handler = _PageReports(callback)
    level = OCR_LOG.level
    OCR_LOG.addHandler(handler)
    OCR_LOG.setLevel(logging.INFO)
    try:
        yield
    finally:
        OCR_LOG.removeHandler(handler)
        OCR_LOG.setLevel(level)


def engine():
    """The process's RapidOCR engine, made on first use."""
    global _engine
    with _engine_lock:
        if _engine is None:
            from rapidocr_onnxruntime import RapidOCR

            _engine = RapidOCR()
        return _engine


def read_image(image) -> str:
    """The text of a PIL image, lines in reading order and paragraphs separated by blank lines."""
    import numpy as np

    image = _bounded(image.convert("RGB"))
    result, _ = engine()(np.asarray(image), use_cls=USE_ORIENTATION_CLASSIFIER)
    boxes = [_Box.of(item) for item in result or [] if float(item[2]) >= MIN_SCORE and str(item[1]).strip()]
    return layout_text(boxes)


def _bounded(image):
    longest = max(image.size)
    if longest <= MAX_SIDE:
        return image
    scale = MAX_SIDE / longest
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


class _Box:
    """One recognised line of text and where it lies on the page."""

    __slots__ = ("text", "left", "top", "bottom")

    def __init__(self, text: str, left: float, top: float, bottom: float):
        self.text, self.left, self.top, self.bottom = text, left, top, bottom

    @classmethod
    def of(cls, item: Sequence) -> "_Box":
        points, text = item[0], str(item[1]).strip()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        return cls(text, min(xs), min(ys), max(ys))

    @property
    def height(self) -> float:
        return max(self.bottom - self.top, 1.0)

    @property
    def middle(self) -> float:
        return (self.top + self.bottom) / 2


def layout_text(boxes: list[_Box]) -> str:
    """Boxes to text: boxes whose vertical middles lie within half a line of each other
    are one line (left to right); a gap above a line of more than :data:`PARAGRAPH_GAP`
    typical line heights starts a paragraph."""
    if not boxes:
        return ""
    lines = list(_lines(sorted(boxes, key=lambda b: b.middle)))
    typical = statistics.median(b.height for b in boxes)
    out: list[str] = []
    previous_bottom = None
    for line in lines:
        top = min(b.top for b in line)
        if previous_bottom is not None and top - previous_bottom > PARAGRAPH_GAP * typical:
            out.append("")
        out.append(" ".join(b.text for b in sorted(line, key=lambda b: b.left)))
        previous_bottom = max(b.bottom for b in line)
    return "\n".join(out)


def _lines(boxes: list[_Box]) -> Iterator[list[_Box]]:
    line: list[_Box] = []
    for box in boxes:
        if line and abs(box.middle - statistics.fmean(b.middle for b in line)) > 0.5 * min(box.height, line[0].height):
            yield line
            line = []
        line.append(box)
    if line:
        yield line


def load_image(path: Path) -> list[Page]:
    """Every frame of an image file (a multi-page TIFF has several) read by OCR, numbered from 1."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    data = io.BytesIO(read_bytes(path))  # missing, a folder, unreadable: said by read_bytes
    try:
        with Image.open(data) as image:
            total = getattr(image, "n_frames", 1)
            pages = []
            for number, frame in enumerate(ImageSequence.Iterator(image), 1):
                pages.append(Page(number, read_image(frame), ocr=True))
                report_page(path, number, total)
    except UnidentifiedImageError:
        raise IngestError(path, "not an image, or a damaged one (unrecognised image data)") from None
    except Image.DecompressionBombError:
        raise IngestError(path, "image too large to read (more than Pillow's decompression-bomb limit)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or inconsistent image data
        raise IngestError(path, f"damaged image ({exc})") from None
    if not any(ch.isalnum() for page in pages for ch in page.text):
        raise IngestError(path, "no text found by OCR")
    return pages
