"""The SQLite chunk store of one knowledge base: documents, chunks and their vectors.

SQLite is the source of truth. The FAISS index is a derived copy that can always
be brought back in step from here (see ``memory.knowledge_base``), which is what
makes a kill at any moment harmless: a document and all its chunks and vectors
are committed in one transaction, or not at all.

Each chunk's BM25 tokens (space-joined) are stored in the same transaction as the
chunk, so the lexical index can be rebuilt without re-running the tokeniser.

Chunk ids come from ``AUTOINCREMENT`` so an id is never reused: an index saved
before a crash may miss ids or hold deleted ones, but an id it holds always
means the same vector.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.pipeline import IndexableChunk
from memory.lexical_index import join_tokens, tokenize

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT,
    size INTEGER,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'skipped')),
    error TEXT,
    chunk_count INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    ocr_pages TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    text_sha TEXT NOT NULL,
    pages TEXT NOT NULL,
    start_offset INTEGER NOT NULL,
    end_offset INTEGER NOT NULL,
    vector BLOB NOT NULL,
    tokens TEXT,
    UNIQUE (document_id, ordinal)
);
CREATE INDEX IF NOT EXISTS chunks_by_text ON chunks(text_sha);
INSERT OR IGNORE INTO meta(key, value) VALUES ('generation', '0');
"""


@dataclass(frozen=True)
class DocumentRecord:
    id: int
    path: str
    sha256: str | None
    size: int | None
    status: str
    error: str | None
    chunk_count: int
    ocr_pages: tuple[int, ...] = ()  # pages read by OCR: a chunk on one of them came from OCR

    def chunk_from_ocr(self, pages: tuple[int, ...]) -> bool:
        """Whether a chunk of this document on ``pages`` was read by OCR."""
        return bool(set(pages) & set(self.ocr_pages))


@dataclass(frozen=True)
class ChunkRecord:
    id: int
    document_id: int
    path: str
    ordinal: int
    text: str
    pages: tuple[int, ...]
    start: int
    end: int
    text_sha: str = ""  # the text's sha256 (what a re-embedding reuses vectors by)


def connect(path: Path, *, create: bool) -> sqlite3.Connection:
    """Open a chunk store in WAL mode; ``create`` makes the file and schema (writers only).

    WAL lets readers keep a consistent snapshot while a writer commits, and a
    killed writer's half transaction is rolled back on the next open. Readers
    never write, so they are never blocked by a writer's lock.
    """
    if not create and not path.is_file():
        raise FileNotFoundError(f"chunk store {path} is missing")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA foreign_keys=ON")
    if create:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        _add_tokens_column(conn)
        _add_ocr_pages_column(conn)
    return conn


def _add_tokens_column(conn: sqlite3.Connection) -> None:
    """Stores made before the lexical index lack ``chunks.tokens``; their NULL tokens are computed on read."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(chunks)")}
    if "tokens" not in columns:
        conn.execute("ALTER TABLE chunks ADD COLUMN tokens TEXT")


def _add_ocr_pages_column(conn: sqlite3.Connection) -> None:
    """Stores made before OCR lack ``documents.ocr_pages``: no page of theirs was OCR'd."""
    if "ocr_pages" not in _document_columns(conn):
        conn.execute("ALTER TABLE documents ADD COLUMN ocr_pages TEXT NOT NULL DEFAULT '[]'")


def _document_columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(documents)")}


class ChunkStore:
    """Typed queries over one knowledge base's SQLite file."""

    def __init__(self, path: Path, *, create: bool = False):
        self.path = path
        self.conn = connect(path, create=create)
        # a reader may open a store no writer has migrated yet: it has no OCR'd pages
        ocr_pages = "ocr_pages" if "ocr_pages" in _document_columns(self.conn) else "'[]'"
        self._doc_select = f"{_DOC_SELECT}, {ocr_pages} FROM documents"

    def close(self) -> None:
        self.conn.close()

    # ---- transactions -------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[None]:
        """One atomic write that bumps the generation."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.conn.execute(
                "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """A read transaction: every query inside sees the same committed state."""
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def generation(self) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    # ---- documents ----------------------------------------------------
    def document(self, path: str) -> DocumentRecord | None:
        row = self.conn.execute(self._doc_select + " WHERE path = ?", (path,)).fetchone()
        return _document_record(row) if row else None

    def documents(self) -> list[DocumentRecord]:
        return [_document_record(r) for r in self.conn.execute(self._doc_select + " ORDER BY path")]

    def put_document(
        self,
        path: str,
        *,
        sha256: str | None,
        size: int | None,
        status: str,
        error: str | None = None,
        chunks: Sequence[IndexableChunk] = (),
        vectors: np.ndarray | None = None,
        ocr_pages: Sequence[int] = (),
    ) -> tuple[list[int], list[int]]:
        """Replace a document's row and chunks (``vectors[i]`` is ``chunks[i]``'s embedding);
        returns (replaced chunk ids, new chunk ids). Call inside ``write()``.
        """
        if len(chunks) != (0 if vectors is None else len(vectors)):
            raise ValueError(f"{len(chunks)} chunks but {0 if vectors is None else len(vectors)} vectors for {path}")
        old_ids = self.delete_document(path)
        cur = self.conn.execute(
            "INSERT INTO documents(path, sha256, size, status, error, chunk_count, updated_at, ocr_pages)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (path, sha256, size, status, error, len(chunks), time.time(), json.dumps(list(ocr_pages))),
        )
        doc_id = cur.lastrowid
        self.conn.executemany(
            "INSERT INTO chunks(document_id, ordinal, text, text_sha, pages, start_offset, end_offset, vector, tokens)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    doc_id,
                    c.ordinal,
                    c.text,
                    c.text_sha,
                    json.dumps(list(c.pages)),
                    c.start,
                    c.end,
                    np.ascontiguousarray(vector, dtype=np.float32).tobytes(),
                    c.tokens if c.tokens is not None else join_tokens(tokenize(c.text)),
                )
                for c, vector in zip(chunks, vectors if vectors is not None else [])
            ],
        )
        new_ids = [r[0] for r in self.conn.execute("SELECT id FROM chunks WHERE document_id = ?", (doc_id,))]
        return old_ids, new_ids

    def delete_document(self, path: str) -> list[int]:
        """Delete a document and its chunks; returns the deleted chunk ids. Call inside ``write()``."""
        row = self.conn.execute("SELECT id FROM documents WHERE path = ?", (path,)).fetchone()
        if row is None:
            return []
        ids = [r[0] for r in self.conn.execute("SELECT id FROM chunks WHERE document_id = ?", (row[0],))]
        self.conn.execute("DELETE FROM chunks WHERE document_id = ?", (row[0],))
        self.conn.execute("DELETE FROM documents WHERE id = ?", (row[0],))
        return ids

    # ---- chunks -------------------------------------------------------
    def chunk_ids(self) -> np.ndarray:
        rows = self.conn.execute("SELECT id FROM chunks ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def chunk_count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def vectors(self, ids: np.ndarray, dimension: int) -> np.ndarray:
        """Vectors of the given chunk ids, in that order."""
        out = np.empty((len(ids), dimension), dtype=np.float32)
        for start in range(0, len(ids), 500):
            batch = [int(i) for i in ids[start : start + 500]]
            marks = ",".join("?" * len(batch))
            found = dict(self.conn.execute(f"SELECT id, vector FROM chunks WHERE id IN ({marks})", batch))
            for offset, chunk_id in enumerate(batch):
                out[start + offset] = np.frombuffer(found[chunk_id], dtype=np.float32)
        return out

    def all_vectors(self, dimension: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every chunk."""
        ids, blobs = [], []
        for chunk_id, blob in self.conn.execute("SELECT id, vector FROM chunks ORDER BY id"):
            ids.append(chunk_id)
            blobs.append(blob)
        vectors = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(-1, dimension)
        return np.asarray(ids, dtype=np.int64), vectors

    def vectors_by_text(self, text_shas: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored vectors for chunk texts already embedded (keyed by the text's sha256)."""
        shas = list(dict.fromkeys(text_shas))
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(shas), 500):
            batch = shas[start : start + 500]
            marks = ",".join("?" * len(batch))
            for sha, blob in self.conn.execute(
                f"SELECT text_sha, vector FROM chunks WHERE text_sha IN ({marks}) GROUP BY text_sha", batch
            ):
                found[sha] = np.frombuffer(blob, dtype=np.float32)
        return found

    def chunks(self, ids: Iterable[int]) -> dict[int, ChunkRecord]:
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(_CHUNK_SELECT + f" WHERE c.id IN ({marks})", ids)
        return {r[0]: _chunk_record(r) for r in rows}

    def chunks_of_document(self, document_id: int, first: int, last: int) -> list[ChunkRecord]:
        rows = self.conn.execute(
            _CHUNK_SELECT + " WHERE c.document_id = ? AND c.ordinal BETWEEN ? AND ? ORDER BY c.ordinal",
            (document_id, first, last),
        )
        return [_chunk_record(r) for r in rows]

    def iter_tokens(self) -> Iterator[tuple[int, list[str]]]:
        """(id, BM25 tokens) of every chunk, one at a time, for building the BM25 index."""
        for chunk_id, tokens, text in self.conn.execute("SELECT id, tokens, text FROM chunks ORDER BY id"):
            yield chunk_id, tokens.split() if tokens is not None else tokenize(text)

    def iter_chunk_texts(self) -> Iterator[tuple[int, str]]:
        yield from self.conn.execute("SELECT id, text FROM chunks ORDER BY id")

    def check_consistency(self) -> list[str]:
        """Problems in the store itself (empty when consistent)."""
        problems = []
        bad_counts = self.conn.execute(
            "SELECT d.path, d.chunk_count, COUNT(c.id) FROM documents d LEFT JOIN chunks c ON c.document_id = d.id"
            " GROUP BY d.id HAVING d.chunk_count != COUNT(c.id)"
        ).fetchall()
        problems += [f"{p}: chunk_count {n} but {m} chunks stored" for p, n, m in bad_counts]
        orphans = self.conn.execute(
            "SELECT COUNT(*) FROM chunks WHERE document_id NOT IN (SELECT id FROM documents)"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} chunks without a document")
        integrity = self.conn.execute("PRAGMA integrity_check").fetchone()[0]
        if integrity != "ok":
            problems.append(f"sqlite integrity: {integrity}")
        return problems


_DOC_SELECT = "SELECT id, path, sha256, size, status, error, chunk_count"
_CHUNK_SELECT = (
    "SELECT c.id, c.document_id, d.path, c.ordinal, c.text, c.pages, c.start_offset, c.end_offset, c.text_sha"
    " FROM chunks c JOIN documents d ON d.id = c.document_id"
)


def _document_record(row: tuple) -> DocumentRecord:
    *fields, ocr_pages = row
    return DocumentRecord(*fields, tuple(json.loads(ocr_pages)))


def _chunk_record(row: tuple) -> ChunkRecord:
    chunk_id, doc_id, path, ordinal, text, pages, start, end, text_sha = row
    return ChunkRecord(chunk_id, doc_id, path, ordinal, text, tuple(json.loads(pages)), start, end, text_sha)
