"""Read a file from disk into a :class:`~ingest.documents.LoadedDocument`.

    load(Path("手册.pdf"))  -> LoadedDocument(pages=[Page(1, ...), Page(2, ...), ...])
    load(Path("笔记.md"))   -> LoadedDocument(pages=[Page(None, ...)])

Every failure a user can cause with a bad file is an :class:`IngestError` whose
``reason`` says what is wrong in words ("encrypted (password-protected)",
"empty file", "binary file ...", ...); files with an extension zhiku does not
read raise :class:`UnsupportedFile`. Nothing from pdfminer escapes.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from pathlib import Path

from ingest.documents import IngestError, LoadedDocument, Page, UnsupportedFile

PDF_SUFFIXES = frozenset({".pdf"})
TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown"})
SUPPORTED_SUFFIXES = PDF_SUFFIXES | TEXT_SUFFIXES

# A PDF needs at least this many letters / CJK characters in its text layer to
# count as having text; scanned pages often carry nothing but a stamped date
# or page numbers ("2021 3 31").
MIN_PDF_LETTERS = 8

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
_CID = re.compile(r"\(cid:\d+\)")


def load(path: Path) -> LoadedDocument:
    """Load ``path`` (``.pdf``, ``.txt``, ``.md``, ``.markdown``; case-insensitive).

    Raises :class:`UnsupportedFile` for other extensions and :class:`IngestError`
    for files that cannot be read, with a reason meant for the user.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise UnsupportedFile(path, f"unsupported file type {suffix or '(no extension)'}")
    if suffix in PDF_SUFFIXES:
        return LoadedDocument(path, load_pdf_pages(path))
    return LoadedDocument(path, [Page(None, decode_text(_read_bytes(path), path))])


# --------------------------------------------------------------------------- text


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise IngestError(path, "is a directory, not a file") from None
    except FileNotFoundError:
        raise IngestError(path, "no such file") from None
    except PermissionError:
        raise IngestError(path, "permission denied") from None
    except OSError as exc:
        raise IngestError(path, f"cannot read file: {exc.strerror or exc}") from None


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


# ---------------------------------------------------------------------------- PDF


def load_pdf_pages(path: Path) -> list[Page]:
    """Text of every page of a PDF, numbered from 1.

    Raises IngestError: "empty file", "encrypted (password-protected)",
    "malformed PDF: ...", or "no extractable text (scanned?)".
    """
    data = _read_bytes(path)
    if not data:
        raise IngestError(path, "empty file")
    if b"%PDF-" not in data[:1024]:
        raise IngestError(path, "malformed PDF: not a PDF file (no %PDF- header)")

    import pdfplumber  # heavy import, only when a PDF is loaded
    from pdfminer.pdfdocument import PDFEncryptionError, PDFPasswordIncorrect
    from pdfminer.psexceptions import PSException
    from pdfplumber.utils.exceptions import MalformedPDFException, PdfminerException

    pages: list[Page] = []
    try:
        with pdfplumber.open(path, raise_unicode_errors=False) as pdf:
            for page in pdf.pages:
                try:
                    pages.append(Page(page.page_number, page.extract_text() or ""))
                finally:
                    page.close()  # drop the page's parsed objects: memory stays flat on long PDFs
    except PdfminerException as exc:
        # pdfplumber wraps whatever pdfminer raised while opening or parsing a page.
        cause = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
        if isinstance(cause, PDFPasswordIncorrect):
            raise IngestError(path, "encrypted (password-protected)") from None
        if isinstance(cause, PDFEncryptionError):
            raise IngestError(path, f"encrypted (unsupported encryption: {_describe(cause)})") from None
        if isinstance(cause, RecursionError):
            raise IngestError(path, "malformed PDF: objects nested too deeply (circular references?)") from None
        if isinstance(cause, MemoryError):
            raise cause from None
        raise IngestError(path, f"malformed PDF: {_describe(cause)}") from None
    except (PSException, MalformedPDFException) as exc:
        raise IngestError(path, f"malformed PDF: {_describe(exc)}") from None
    except RecursionError:
        raise IngestError(path, "malformed PDF: objects nested too deeply (circular references?)") from None
    except MemoryError:
        raise
    except OSError as exc:
        raise IngestError(path, f"cannot read file: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - pdfminer signals bad input with plain KeyError, TypeError, ...
        raise IngestError(path, f"malformed PDF: {_describe(exc)}") from None

    if not pages:
        raise IngestError(path, "malformed PDF: no pages")
    letters = sum(1 for page in pages for ch in _CID.sub("", page.text) if ch.isalpha())
    if letters < MIN_PDF_LETTERS:
        raise IngestError(path, "no extractable text (scanned?)")
    return pages


def _describe(exc: BaseException) -> str:
    message = str(exc).strip()
    name = type(exc).__name__
    if not message:
        return name
    if len(message) > 200:
        message = message[:200] + "…"
    return f"{name}: {message}"
