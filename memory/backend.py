"""The one interface every knowledge-base backend implements, and the types it speaks.

A knowledge base is documents (a registry: path, sha256, size, status, error)
and their chunks (text, ordinal, pages, offsets, a normalised dense vector and
BM25 terms). :class:`KnowledgeBase` is what ingestion writes through and what
retrieval reads through; a backend (``memory.local_backend``: SQLite + FAISS +
BM25 files; ``memory.milvus_backend``: Milvus collections) implements its
abstract methods, and the shared behaviour (neighbour expansion) lives here,
written once against those methods. Each knowledge base records its backend
in its :class:`Manifest`.

Scores are cosine similarities of L2-normalised vectors: 1.0 is identical,
higher is better.
"""

from __future__ import annotations

import json
import unicodedata
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ingest.pipeline import IndexableChunk
from memory.chunk_store import ChunkRecord, DocumentRecord
from memory.files import write_atomically

_NAME = re.compile(r"^\w[\w.\-]{0,63}$")


class KnowledgeBaseError(Exception):
    """An error about a knowledge base, worded for the user."""


class KnowledgeBaseNotFound(KnowledgeBaseError):
    pass


class KnowledgeBaseBusy(KnowledgeBaseError):
    pass


class EmbedderMismatch(KnowledgeBaseError):
    pass


class KnowledgeBaseUnavailable(KnowledgeBaseError):
    """The store holding a knowledge base cannot be reached (a Milvus that is down): retry later."""


KB_NAME_RULE = (
    "Knowledge-base name: 1-64 letters (any script), digits, '_', '-' or '.', starting with a letter or digit, "
    "no '..', in Unicode NFKC form (no full-width look-alikes)."
)


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe knowledge-base name, else raise.

    Letters and digits of any script (Chinese works), ``_``, ``-`` and ``.``;
    no path separators, no leading dot, no ``..``, at most 64 characters, and
    already in Unicode NFKC form, so that look-alikes (full-width ``ｋｂ``, the
    Ångström sign) are refused rather than becoming a second knowledge base.

    >>> validate_name("产品手册-v2")
    '产品手册-v2'
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise KnowledgeBaseError(
            f"invalid knowledge-base name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (no '/', no '..')"
        )
    normal = unicodedata.normalize("NFKC", name)
    if normal != name:
        raise KnowledgeBaseError(f"invalid knowledge-base name {name!r}: write it in normal form, {normal!r}")
    return name


@dataclass(frozen=True)
class Manifest:
    """What a knowledge base is; pinned at creation, changed only by ``ingest rebuild``."""

    name: str
    embedding_model: str
    dimension: int
    chunk_size: int
    chunk_overlap: int
    store: str
    format: int = 1
    created: str = ""  # when the name was (re)created: tells a re-created knowledge base from the old one
    backend: str = "local"  # which store holds it: "local" (SQLite + FAISS + BM25 files) or "milvus"

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        return cls.from_json(path.read_text(encoding="utf-8"))

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2)

    def write(self, path: Path) -> None:
        write_atomically(path, self.to_json().encode("utf-8"))


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk and its cosine similarity to the query."""

    chunk: ChunkRecord
    score: float


def _contiguous(chunks: list[ChunkRecord]) -> bool:
    return all(b.ordinal == a.ordinal + 1 for a, b in zip(chunks, chunks[1:]))


def join_without_overlap(chunks: list[ChunkRecord]) -> str:
    """Join consecutive chunks of one document, dropping the text they share.

    Chunks carry their offsets in the cleaned document, so the overlap is exact:

    >>> a = ChunkRecord(1, 1, "d", 0, "甲乙丙丁", (), 0, 4)
    >>> b = ChunkRecord(2, 1, "d", 1, "丙丁戊己", (), 2, 6)
    >>> join_without_overlap([a, b])
    '甲乙丙丁戊己'
    """
    if not chunks:
        return ""
    parts = [chunks[0].text]
    end = chunks[0].end
    for chunk in chunks[1:]:
        skip = max(0, end - chunk.start)
        parts.append(chunk.text[skip:] if chunk.start < end else "\n" + chunk.text)
        end = max(end, chunk.end)
    return "".join(parts)


@dataclass(frozen=True)
class DocumentUpdate:
    """The new state of one document, committed by ``KnowledgeBase.put_documents``."""

    path: str
    sha256: str | None
    size: int | None
    status: str
    error: str | None = None
    chunks: tuple[IndexableChunk, ...] = ()
    vectors: np.ndarray | None = None  # one row per chunk
    ocr_pages: tuple[int, ...] = ()  # pages read by OCR: a chunk on one of them came from OCR


class KnowledgeBase(ABC):
    """One opened knowledge base, whatever holds it.

    Readers call :meth:`refresh` before a search to see the latest committed
    writes; writers (opened through ``KnowledgeBases.writer``) commit documents
    with :meth:`put_documents` and :meth:`delete_documents`, each all-or-nothing
    as far as readers can tell.
    """

    def __init__(self, manifest: Manifest, *, writable: bool):
        self.manifest = manifest
        self.writable = writable

    @property
    def name(self) -> str:
        return self.manifest.name

    def _require_writable(self) -> None:
        if not self.writable:
            raise KnowledgeBaseError(f"knowledge base {self.name!r} was opened read-only")

    # ---- what a backend implements -------------------------------------
    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def refresh(self) -> bool:
        """Catch up with writes committed since the last refresh; True when something changed."""

    @abstractmethod
    def documents(self) -> list[DocumentRecord]:
        """Every committed document, by path."""

    @abstractmethod
    def document(self, path: str) -> DocumentRecord | None: ...

    @abstractmethod
    def put_documents(self, updates: list[DocumentUpdate]) -> None:
        """Replace these documents (rows, chunks and vectors); readers see each whole or not at all."""

    @abstractmethod
    def delete_documents(self, paths: list[str]) -> int:
        """Delete documents by stored path; returns how many existed."""

    @abstractmethod
    def search(self, query_vector: np.ndarray, top_k: int) -> list[Hit]:
        """The ``top_k`` chunks most similar to one normalised query vector, best first."""

    @abstractmethod
    def lexical_search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` chunks with the best BM25 score for ``query``: (chunk id, score), best first."""

    @abstractmethod
    def chunks(self, ids: Iterable[int]) -> dict[int, ChunkRecord]:
        """The committed chunks among ``ids``, by id."""

    @abstractmethod
    def chunks_of_document(self, document_id: int, first: int, last: int) -> list[ChunkRecord]:
        """The chunks of one document with ordinals ``first..last``, in order."""

    @abstractmethod
    def chunk_vectors(self, ids: list[int]) -> np.ndarray:
        """Stored (normalised) vectors of chunk ids, in that order."""

    @abstractmethod
    def vectors_by_text(self, text_shas: Iterable[str]) -> dict[str, np.ndarray]:
        """A stored vector for each text hash already embedded here (what re-ingest reuses)."""

    @abstractmethod
    def chunk_count(self) -> int: ...

    @abstractmethod
    def check_consistency(self) -> list[str]:
        """Problems found (empty when everything agrees)."""

    # ---- shared behaviour ------------------------------------------------
    def all_chunks(self) -> list[ChunkRecord]:
        """Every committed chunk, document by document in ordinal order (for checks and copies, not for serving)."""
        return [c for d in self.documents() if d.chunk_count for c in self.chunks_of_document(d.id, 0, d.chunk_count - 1)]

    def expand(self, chunk: ChunkRecord, step: int, char_budget: int) -> str:
        """The chunk joined with up to ``step`` neighbours on each side, overlap removed."""
        return join_without_overlap(self.neighbourhood(chunk, step, char_budget))

    def neighbourhood(self, chunk: ChunkRecord, step: int, char_budget: int) -> list[ChunkRecord]:
        """The chunk and up to ``step`` neighbours on each side, in document order.

        Neighbours are added nearest first, alternating after/before, while the
        joined text stays within ``char_budget`` characters (the hit itself is
        always kept whole).
        """
        if step <= 0:
            return [chunk]
        around = self.chunks_of_document(chunk.document_id, chunk.ordinal - step, chunk.ordinal + step)
        by_ordinal = {c.ordinal: c for c in around}
        chosen = [chunk]
        for distance in range(1, step + 1):
            for ordinal in (chunk.ordinal + distance, chunk.ordinal - distance):
                neighbour = by_ordinal.get(ordinal)
                if neighbour is None:
                    continue
                candidate = sorted(chosen + [neighbour], key=lambda c: c.ordinal)
                if _contiguous(candidate) and len(join_without_overlap(candidate)) <= char_budget:
                    chosen = candidate
        return sorted(chosen, key=lambda c: c.ordinal)
