"""Zip packages (Office Open XML, EPUB): opening them, and damage found while reading them, as IngestErrors.

Office saves a password-protected .docx/.xlsx/.pptx as an OLE compound file, not
a zip; that is how "encrypted" is told from "corrupt".
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ingest.documents import IngestError
from ingest.text import reading

OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # an OLE2 compound file: old binary Office, or encrypted OOXML

T = TypeVar("T")


def open_package(path: Path, kind: str, opener: Callable[[Path], T]) -> T:
    """``opener(path)`` with every way a damaged or protected package fails turned into an IngestError."""
    with reading(path), open(path, "rb") as file:
        head = file.read(8)
    if not head:
        raise IngestError(path, "empty file")
    if head == OLE_MAGIC:
        raise IngestError(path, f"encrypted (password-protected) or an old binary file saved as {kind}")
    if not zipfile.is_zipfile(path):
        raise IngestError(path, f"corrupt {kind} file (not a zip package)")
    try:
        return opener(path)
    except (IngestError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - the libraries signal bad packages with KeyError, ValueError, lxml errors...
        raise IngestError(path, f"corrupt {kind} file ({_describe(exc)})") from None


def _describe(exc: BaseException) -> str:
    message = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def read_package(path: Path, kind: str, read: Callable[[], T]) -> T:
    """``read()`` (walking an opened package) with damage found on the way reported as for opening."""
    try:
        return read()
    except (IngestError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - see open_package
        raise IngestError(path, f"corrupt {kind} file ({_describe(exc)})") from None
