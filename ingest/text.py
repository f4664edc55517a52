"""Text files: bytes to text in whatever encoding a Chinese or English file comes in.

``decode_text`` is the one charset decision of ingest: plain text and Markdown,
CSV, JSON, and web pages without a charset declaration all go through it.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from contextlib import contextmanager
import unicodedata
from pathlib import Path

from ingest.documents import IngestError

# How much of a text file chardet looks at: plenty to decide, fast on big files.
_DETECT_SAMPLE = 256 * 1024
# Decoded text with more than this share of control characters is binary.
_MAX_CONTROL_RATIO = 0.05

# Undecodable bytes per valid non-ASCII character allowed in a file still read as UTF-8
# (or at most 2 among 50 or more valid ones).
_MAX_BAD_UTF8 = 0.001

# chardet guesses below this confidence are second to GB18030 when that decodes to Chinese.
_CONFIDENT = 0.5

_GB_FAMILY = {"gb2312", "gbk", "gb18030", "cp936", "euc-cn", "hz-gb-2312", "x-gbk"}



@contextmanager
def reading(path: Path) -> Iterator[None]:
    """What can go wrong opening or reading ``path`` from disk, as an IngestError naming the reason."""
    try:
        yield
    except IsADirectoryError:
        raise IngestError(path, "is a directory, not a file") from None
    except FileNotFoundError:
        raise IngestError(path, "no such file") from None
    except PermissionError:
        raise IngestError(path, "permission denied") from None
    except OSError as exc:
        raise IngestError(path, f"cannot read file: {exc.strerror or exc}") from None


def read_bytes(path: Path) -> bytes:
    """The file's bytes; what can go wrong reading it is an IngestError."""
    with reading(path):
        return path.read_bytes()


_BOMS = (
    # UTF-32 first: its little-endian BOM starts with the UTF-16 LE one.
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def decode_text(data: bytes, path: Path | str = "<bytes>") -> str:
    """Decode the bytes of a text file; the BOM, if any, is dropped.

    Order: a BOM decides (UTF-8, UTF-16 LE/BE, UTF-32); then strict UTF-8, right for
    most files (a file that is UTF-8 but for one or two bad bytes stays UTF-8, the
    bad bytes becoming U+FFFD); then chardet, where any GB2312/GBK guess decodes as
    GB18030 (a superset: rare characters such as 镕 or 㐀 survive). An unsure guess
    (confidence < 0.5, e.g. Windows-1252 for a mostly-ASCII GBK file) loses to
    GB18030 when GB18030 decodes the bytes to Chinese - the Chinese-first choice,
    at the price of a very short Latin-1 text being misread.

    Binary data (NUL bytes without a UTF-16/32 encoding, undecodable bytes, mostly
    control characters) raises ``IngestError("binary file ...")``; empty or
    whitespace-only text raises ``IngestError("no text")``.
    """
    if not data.strip():
        raise IngestError(path, "no text (empty file)" if not data else "no text")
    text = None
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                text = data[len(bom) :].decode(encoding)
            except UnicodeDecodeError:
                raise IngestError(path, f"binary file or corrupt {encoding} text (BOM present)") from None
            break
    if text is None:
        text = _decode_without_bom(data, path)
    if _looks_binary(text):
        raise IngestError(path, "binary file (mostly control characters), not text")
    if not text.strip():
        raise IngestError(path, "no text")
    return text


def _decode_without_bom(data: bytes, path: Path | str) -> str:
    has_nul = b"\x00" in data
    if not has_nul:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        # UTF-8 with a few bad bytes (a file cut mid-character, one stray Latin-1 byte):
        # still UTF-8. Text in a legacy encoding fails on nearly every non-ASCII character.
        lenient = data.decode("utf-8", errors="replace")
        bad = lenient.count("\ufffd") - data.count("\ufffd".encode())
        good = sum(1 for ch in lenient if not ch.isascii() and ch != "\ufffd")
        if bad <= _MAX_BAD_UTF8 * good or (bad <= 2 and good >= 50):
            return lenient
    import chardet  # imported lazily: not needed for the common UTF-8 case

    guess = chardet.detect(data[:_DETECT_SAMPLE])
    encoding = (guess.get("encoding") or "").lower()
    if has_nul:
        # Text files never contain NUL unless they are UTF-16/32 without a BOM.
        if encoding.startswith(("utf-16", "utf-32")):
            text = _try_decode(data, encoding)
            if text is not None and _mostly_common_script(text):
                return text
        raise IngestError(path, "binary file (contains NUL bytes), not text")
    if encoding in _GB_FAMILY:
        candidates = ["gb18030"]
    elif encoding and (guess.get("confidence") or 0) >= _CONFIDENT:
        candidates = [encoding, "gb18030"]
    else:
        # An unsure guess (typically Windows-1252 for a mostly-ASCII GBK file): GB18030
        # first when it decodes to Chinese, then the guess, then GB18030 anyway.
        gb = _try_decode(data, "gb18030")
        if gb is not None and _mostly_cjk(gb):
            return gb
        candidates = [encoding, "gb18030"] if encoding else ["gb18030"]
    for candidate in candidates:
        text = _try_decode(data, candidate)
        if text is not None:
            return text
    raise IngestError(path, "binary file or unknown text encoding (not UTF-8, GB18030 or a detectable encoding)")


def _try_decode(data: bytes, encoding: str) -> str | None:
    try:
        return data.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return None


def _mostly_cjk(text: str) -> bool:
    """Nine in ten non-ASCII characters are CJK ideographs or CJK/full-width punctuation."""
    others = [ch for ch in text if not ch.isascii()]
    cjk = sum(1 for ch in others if "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef" or "\U00020000" <= ch)
    return bool(others) and cjk >= 0.9 * len(others)


def _mostly_common_script(text: str) -> bool:
    """Nine in ten characters are ASCII, CJK, full-width or whitespace.

    Guards BOM-less UTF-16/32 guesses: binary data decoded that way turns into a
    scatter of rare code points.
    """
    sample = text[:_DETECT_SAMPLE]
    common = sum(
        1
        for ch in sample
        if ch.isascii() or ch.isspace() or "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef" or ch >= "\U00020000"
    )
    return common >= 0.9 * max(len(sample), 1)


def _looks_binary(text: str) -> bool:
    if "\x00" in text:
        return True
    sample = text[:_DETECT_SAMPLE]
    controls = sum(1 for ch in sample if unicodedata.category(ch) == "Cc" and ch not in "\t\n\r\f\v")
    return controls > _MAX_CONTROL_RATIO * max(len(sample), 1)
