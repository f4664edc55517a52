"""load → clean → split for one file, and the expansion of user-given paths into files.

    >>> from settings import Settings
    >>> s = Settings()
    >>> for path in iter_candidate_files([Path("docs")]):             # doctest: +SKIP
    ...     try:
    ...         prepared = prepare_file(path, s.chunk_size, s.chunk_overlap)
    ...     except UnsupportedFile as exc:
    ...         print("skipped", exc)
    ...     except IngestError as exc:
    ...         print("failed", exc)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ingest.clean import clean_document
from ingest.documents import Chunk, CleanedDocument, IngestError, ReadOptions, UnsupportedFile
from ingest.loaders import SUPPORTED_SUFFIXES, load
from ingest.split import split_document

__all__ = [
    "SUPPORTED_SUFFIXES",
    "IngestError",
    "PreparedDocument",
    "UnsupportedFile",
    "iter_candidate_files",
    "prepare_file",
    "prepare_files",
]


@dataclass(frozen=True)
class PreparedDocument:
    """A file ready to be embedded: its cleaned text and its chunks."""

    path: Path
    cleaned: CleanedDocument
    chunks: list[Chunk] = field(default_factory=list)
    ocr_pages: tuple[int, ...] = ()  # the pages whose text OCR read


def prepare_file(path: Path, chunk_size: int, chunk_overlap: int, options: ReadOptions = ReadOptions()) -> PreparedDocument:
    """Load (as ``options`` say: OCR, PDF tables), clean and split ``path``.

    Raises :class:`UnsupportedFile` for extensions zhiku does not read and
    :class:`IngestError` for unreadable files and for files with nothing left after
    cleaning ("no text after cleaning": e.g. only page numbers or link lists).
    """
    path = Path(path)
    loaded = load(path, options)
    cleaned = clean_document(loaded)
    if not any(ch.isalnum() for ch in cleaned.text):
        raise IngestError(path, "no text after cleaning")
    chunks = split_document(cleaned, chunk_size, chunk_overlap)
    if not chunks:  # pragma: no cover - non-empty text always gives a chunk
        raise IngestError(path, "no text after cleaning")
    return PreparedDocument(path, cleaned, chunks, loaded.ocr_pages)


def text_sha256(text: str) -> str:
    """The key a chunk's text is stored and its vector reused under."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class IndexableChunk(NamedTuple):
    """A chunk with what storing it needs besides its vector: the text's sha256 and its BM25 tokens.

    The one chunk record from the pipeline to the store (``ChunkStore.put_document``).
    """

    ordinal: int
    text: str
    text_sha: str
    pages: tuple[int, ...]
    start: int
    end: int
    tokens: str | None = None  # space-joined BM25 tokens; the store computes them from ``text`` when None


class PreparedFile(NamedTuple):
    """What :func:`prepare_files` made of one file: status ``ok``, ``skipped`` or ``failed``."""

    status: str
    reason: str | None
    chunks: list[IndexableChunk]
    ocr_pages: tuple[int, ...] = ()  # the pages whose text OCR read (a chunk on one of them came from OCR)


def prepare_files(
    paths: list[str],
    chunk_size: int,
    chunk_overlap: int,
    token_text: Callable[[str], str],
    options: ReadOptions = ReadOptions(),
) -> list[PreparedFile]:
    """:func:`prepare_file` for several files, each chunk hashed and tokenised by ``token_text``.

    Errors a user's file can cause come back as values (they cross a process
    boundary, and IngestError does not pickle); anything else raises.
    """
    out = []
    for path in paths:
        try:
            prepared = prepare_file(Path(path), chunk_size, chunk_overlap, options)
        except UnsupportedFile as exc:
            out.append(PreparedFile("skipped", exc.reason, []))
            continue
        except IngestError as exc:
            out.append(PreparedFile("failed", exc.reason, []))
            continue
        chunks = [
            IndexableChunk(
                c.ordinal,
                c.text,
                text_sha256(c.text),
                tuple(c.pages),
                c.start,
                c.end,
                token_text(c.text),
            )
            for c in prepared.chunks
        ]
        out.append(PreparedFile("ok", None, chunks, prepared.ocr_pages))
    return out


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def iter_candidate_files(paths: Iterable[Path]) -> Iterator[Path]:
    """The files to ingest for the paths a user gave.

    A directory is walked recursively in sorted order, skipping hidden files and
    directories (names starting with "."); *every* other file in it is yielded, so
    that the caller can report unsupported ones as skipped. A path that is not a
    directory is yielded as given (even when hidden or missing: loading it then
    reports the problem). Each file is yielded once.
    """
    seen: set[Path] = set()

    def once(path: Path) -> bool:
        try:
            key = path.resolve()
        except OSError:  # pragma: no cover - e.g. a symlink loop
            key = path.absolute()
        if key in seen:
            return False
        seen.add(key)
        return True

    for given in paths:
        given = Path(given)
        if not given.is_dir():
            if once(given):
                yield given
            continue
        for root, dirs, files in os.walk(given):
            dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
            for name in sorted(files):
                if _is_hidden(name):
                    continue
                path = Path(root) / name
                if once(path):
                    yield path
