"""Named knowledge bases on disk.

Layout under ``<ZHIKU_HOME>/kb/``::

    <name>/manifest.json          what the knowledge base is: embedder, dimension, chunking, active store
    <name>/<store>/chunks.sqlite  documents, chunks and vectors (the source of truth)
    <name>/<store>/vectors.<generation>.faiss   the FAISS copy of the vectors
    <name>/<store>/lexical.<generation>/        the BM25 index over the chunks' stored tokens
    .locks/<name>.lock            held by the one writer

Scores are cosine similarities of L2-normalised vectors: 1.0 is identical,
higher is better (FAISS inner product, not an L2 distance).

Crash safety: every write is one SQLite transaction that bumps the store's
*generation*; the FAISS file is saved atomically under the generation it
reflects. Opening a knowledge base whose newest FAISS file is older than the
store brings it in step (removing and adding the differing chunk ids), so a kill
at any moment leaves a loadable, consistent knowledge base. The manifest is
written last on create and replaced atomically on rebuild, so a half-created or
half-rebuilt store is never the active one.

The BM25 index follows the same rule: a folder saved atomically under the
generation it reflects. It is rebuilt from the tokens stored with each chunk
(cheap: no tokeniser runs) whenever the newest saved folder is older than the
store; writers save it when they close, readers only build it in memory. It is
built lazily, on the first lexical search, so dense-only work never pays for it.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from filelock import FileLock, Timeout

from ingest.pipeline import IndexableChunk
from memory.chunk_store import ChunkRecord, ChunkStore, DocumentRecord
from memory.files import fsync_dir, write_atomically
from memory.lexical_index import LexicalIndex, LexicalIndexError, tokenize

if TYPE_CHECKING:
    from memory.vector_index import VectorIndex

MANIFEST = "manifest.json"
STORE_DB = "chunks.sqlite"
_INDEX_FILE = re.compile(r"^vectors\.(\d+)\.faiss$")
_LEXICAL_DIR = re.compile(r"^lexical\.(\d+)$")
_LEXICAL_TMP = re.compile(r"^\.lexical\.\d+\..*\.tmp$")
_NAME = re.compile(r"^\w[\w.\-]{0,63}$")


class KnowledgeBaseError(Exception):
    """An error about a knowledge base, worded for the user."""


class KnowledgeBaseNotFound(KnowledgeBaseError):
    pass


class KnowledgeBaseBusy(KnowledgeBaseError):
    pass


class EmbedderMismatch(KnowledgeBaseError):
    pass


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

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def write(self, path: Path) -> None:
        write_atomically(path, json.dumps(asdict(self), ensure_ascii=False, indent=2).encode("utf-8"))


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk and its cosine similarity to the query."""

    chunk: ChunkRecord
    score: float


class KnowledgeBase:
    """One opened knowledge base: its chunk store and its FAISS index, in step."""

    def __init__(
        self, directory: Path, manifest: Manifest, *, writable: bool, exact_max: int, nprobe: int, index_save_interval: float = 30.0
    ):
        self.directory = directory
        self._index_save_interval = index_save_interval
        self.manifest = manifest
        self.writable = writable
        self._exact_max = exact_max
        self._nprobe = nprobe
        self.store = ChunkStore(self.store_dir / STORE_DB, create=writable)
        self._index: VectorIndex | None = None  # loaded on first use, see ``index``
        self._index_generation = -1  # the store generation the loaded index reflects
        self._lexical: LexicalIndex | None = None
        self._lexical_generation = -1
        self._index_saved_at = time.monotonic()

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def store_dir(self) -> Path:
        return self.directory / self.manifest.store

    def close(self) -> None:
        if self.writable:
            self.save_index()
            if not (self.store_dir / f"lexical.{self.store.generation()}").is_dir():
                self.save_lexical()
        self.store.close()

    # ---- keeping the index in step with the store ---------------------
    @property
    def index(self) -> VectorIndex:
        """The FAISS index, in step with the store as of the last :meth:`refresh`.

        Loaded on first use: an ``ingest add`` that finds every file unchanged never
        reads it (nor imports faiss), which keeps such a run at a fraction of a second.
        """
        if self._index is None:
            self.refresh()
        return self._index

    def refresh(self) -> bool:
        """Bring the in-memory index up to the store's latest commit; True when it changed."""
        from memory.vector_index import reconcile

        with self.store.snapshot():
            generation = self.store.generation()
            if self._index is not None and generation == self._index_generation:
                return False
            saved_generation, index = self._newest_saved_index(generation)
            if saved_generation != generation:
                reconcile(index, self.store.chunk_ids(), self._vectors_of)
            self._index = index.rebuilt_for_size(self._all_vectors, self._exact_max, self._nprobe)
            self._index_generation = generation
        return True

    def _newest_saved_index(self, at_most: int) -> tuple[int, VectorIndex]:
        """The newest readable FAISS file no newer than the store, else an empty index."""
        from memory.vector_index import VectorIndex, VectorIndexError

        for generation, path in sorted(self._index_files(), reverse=True):
            if generation > at_most:
                continue
            try:
                return generation, VectorIndex.load(path)
            except VectorIndexError:
                continue
        return -1, VectorIndex.create(self.manifest.dimension)

    def _index_files(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.store_dir.iterdir():
            match = _INDEX_FILE.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return found

    def _vectors_of(self, ids: np.ndarray) -> np.ndarray:
        return self.store.vectors(ids, self.manifest.dimension)

    def _all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return self.store.all_vectors(self.manifest.dimension)

    def save_index(self) -> None:
        """Save the index under its generation and drop older files (writers only)."""
        if not self.writable or self._index is None:  # never loaded: nothing changed it
            return
        current = self.store_dir / f"vectors.{self._index_generation}.faiss"
        if not current.exists():
            self.index.save(current)
        for generation, path in self._index_files():
            if generation < self._index_generation:
                path.unlink(missing_ok=True)
        self._index_saved_at = time.monotonic()

    # ---- the lexical (BM25) index ----------------------------------------
    def lexical_index(self) -> LexicalIndex:
        """The BM25 index at the store's latest commit, loaded or rebuilt from stored tokens."""
        with self.store.snapshot():
            generation = self.store.generation()
            if generation != self._lexical_generation or self._lexical is None:
                self._lexical = self._saved_lexical(generation) or LexicalIndex.build_streaming(self.store.iter_tokens())
                self._lexical_generation = generation
        return self._lexical

    def _saved_lexical(self, generation: int) -> LexicalIndex | None:
        path = self.store_dir / f"lexical.{generation}"
        if not path.is_dir():
            return None
        try:
            return LexicalIndex.load(path)
        except LexicalIndexError:
            return None  # unreadable: rebuilt from the store (and re-saved by the next writer)

    def _lexical_dirs(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.store_dir.iterdir():
            match = _LEXICAL_DIR.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return found

    def save_lexical(self) -> None:
        """Save the BM25 index under the store's generation; drop older and half-written folders (writers only)."""
        if not self.writable:
            return
        index = self.lexical_index()
        generation = self._lexical_generation
        current = self.store_dir / f"lexical.{generation}"
        if not current.is_dir() or self._saved_lexical(generation) is None:
            shutil.rmtree(current, ignore_errors=True)
            index.save(current)
        for older, path in self._lexical_dirs():
            if older < generation:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.store_dir.iterdir():
            if _LEXICAL_TMP.match(path.name):
                shutil.rmtree(path, ignore_errors=True)

    def lexical_search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` chunks with the best BM25 score for ``query``: (chunk id, score), best first."""
        return self.lexical_index().search(tokenize(query), k)

    # ---- writing -------------------------------------------------------
    def put_documents(self, updates: list["DocumentUpdate"]) -> None:
        """Commit several documents (rows, chunks and vectors) in one transaction, then index them."""
        self._require_writable()
        if self._index is None:  # load before the write: reconciling after it would add the new rows twice
            self.refresh()
        removed: list[int] = []
        added: list[int] = []
        added_vectors: list[np.ndarray] = []
        with self.store.write():
            for update in updates:
                old_ids, new_ids = self.store.put_document(
                    update.path,
                    sha256=update.sha256,
                    size=update.size,
                    status=update.status,
                    error=update.error,
                    chunks=update.chunks,
                    vectors=update.vectors,
                )
                removed += old_ids
                added += new_ids
                if update.chunks:
                    added_vectors += list(update.vectors)
        self._apply_to_index(removed, added, added_vectors)

    def delete_documents(self, paths: list[str]) -> int:
        """Delete documents by stored path; returns how many existed."""
        self._require_writable()
        if self._index is None:  # load before the write, as in put_documents
            self.refresh()
        removed: list[int] = []
        existed = 0
        with self.store.write():
            for path in paths:
                if self.store.document(path) is not None:
                    existed += 1
                    removed += self.store.delete_document(path)
        self._apply_to_index(removed, [], [])
        return existed

    def _apply_to_index(self, removed: list[int], added: list[int], vectors: list[np.ndarray]) -> None:
        if removed:
            self.index.remove(np.asarray(removed, dtype=np.int64))
        if added:
            self.index.add(np.asarray(added, dtype=np.int64), np.vstack(vectors).astype(np.float32))
        self._index_generation = self.store.generation()
        self._index = self.index.rebuilt_for_size(self._all_vectors, self._exact_max, self._nprobe)
        if time.monotonic() - self._index_saved_at >= self._index_save_interval:
            self.save_index()

    def _require_writable(self) -> None:
        if not self.writable:
            raise KnowledgeBaseError(f"knowledge base {self.name!r} was opened read-only")

    # ---- reading -------------------------------------------------------
    def search(self, query_vector: np.ndarray, top_k: int) -> list[Hit]:
        """The ``top_k`` chunks most similar to one normalised query vector, best first."""
        if len(self.index) == 0:
            return []
        scores, ids = self.index.search(np.asarray(query_vector, dtype=np.float32).reshape(1, -1), top_k)
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        records = self.store.chunks(i for i, _ in pairs)
        return [Hit(records[i], s) for i, s in pairs if i in records]

    def expand(self, chunk: ChunkRecord, step: int, char_budget: int) -> str:
        """The chunk joined with up to ``step`` neighbours on each side, overlap removed.

        Neighbours are added nearest first, alternating after/before, while the
        joined text stays within ``char_budget`` characters (the hit itself is
        always kept whole).
        """
        return join_without_overlap(self.neighbourhood(chunk, step, char_budget))

    def neighbourhood(self, chunk: ChunkRecord, step: int, char_budget: int) -> list[ChunkRecord]:
        """The chunks :meth:`expand` joins, in document order."""
        if step <= 0:
            return [chunk]
        around = self.store.chunks_of_document(chunk.document_id, chunk.ordinal - step, chunk.ordinal + step)
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

    def chunk_vectors(self, ids: list[int]) -> np.ndarray:
        """Stored (normalised) vectors of chunk ids, in that order."""
        return self._vectors_of(np.asarray(ids, dtype=np.int64))

    def check_consistency(self) -> list[str]:
        """Problems found (empty when the store and the index agree)."""
        problems = self.store.check_consistency()
        store_ids = set(self.store.chunk_ids().tolist())
        index_ids = set(self.index.ids().tolist())
        if store_ids != index_ids:
            problems.append(
                f"index and store disagree: {len(index_ids - store_ids)} vectors without a chunk, "
                f"{len(store_ids - index_ids)} chunks without a vector"
            )
        problems += self._lexical_problems(store_ids)
        return problems

    def _lexical_problems(self, store_ids: set[int]) -> list[str]:
        """The BM25 index (saved one when current, else rebuilt) must cover exactly the stored chunks."""
        lexical_ids = set(self.lexical_index().ids().tolist())
        if lexical_ids == store_ids:
            return []
        return [
            f"lexical index and store disagree: {len(lexical_ids - store_ids)} indexed chunks missing from the store, "
            f"{len(store_ids - lexical_ids)} chunks not indexed"
        ]


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


class KnowledgeBases:
    """The named knowledge bases under one root folder."""

    def __init__(
        self, root: Path, *, exact_max: int = 200_000, nprobe: int = 32, lock_timeout: float = 0.0, index_save_interval: float = 30.0
    ):
        self.root = root
        self._exact_max = exact_max
        self._nprobe = nprobe
        self._lock_timeout = lock_timeout
        self._index_save_interval = index_save_interval

    @classmethod
    def from_settings(cls, settings) -> "KnowledgeBases":
        return cls(
            settings.kb_root,
            exact_max=settings.exact_search_max_chunks,
            nprobe=settings.ivf_nprobe,
            lock_timeout=settings.lock_timeout,
            index_save_interval=settings.index_save_interval,
        )

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def exists(self, name: str) -> bool:
        return (self.root / validate_name(name) / MANIFEST).is_file()

    def manifest(self, name: str) -> Manifest:
        path = self.root / validate_name(name) / MANIFEST
        if not path.is_file():
            known = ", ".join(self.names()) or "none yet"
            raise KnowledgeBaseNotFound(
                f"knowledge base {name!r} does not exist (known: {known}); create it with `ingest add PATH --kb {name}`"
            )
        return Manifest.read(path)

    def documents(self, name: str) -> list[DocumentRecord]:
        """The documents of ``name``, read from its chunk store alone (no index load)."""
        manifest = self.manifest(name)
        store = ChunkStore(self.root / name / manifest.store / STORE_DB)
        try:
            return store.documents()
        finally:
            store.close()

    def open(self, name: str) -> KnowledgeBase:
        """Open for reading; sees committed state only."""
        return self.instance(self.manifest(name), writable=False)

    def instance(self, manifest: Manifest, *, writable: bool) -> KnowledgeBase:
        """A KnowledgeBase object for ``manifest`` (which may not be the active one yet)."""
        return KnowledgeBase(
            self.root / manifest.name,
            manifest,
            writable=writable,
            exact_max=self._exact_max,
            nprobe=self._nprobe,
            index_save_interval=self._index_save_interval,
        )

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the one-writer lock of ``name``, waiting at most ``lock_timeout`` seconds."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(locks / f"{validate_name(name)}.lock")
        try:
            lock.acquire(timeout=self._lock_timeout)
        except Timeout:
            raise KnowledgeBaseBusy(
                f"knowledge base {name!r} is being written by another process; "
                "try again when it finishes (or set ZHIKU_LOCK_TIMEOUT to wait)"
            ) from None
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def writer(self, name: str, *, create: Manifest | None = None) -> Iterator[KnowledgeBase]:
        """Open ``name`` for writing under its lock, creating it from ``create`` when missing."""
        with self.lock(name):
            if not self.exists(name):
                if create is None:
                    self.manifest(name)  # raises KnowledgeBaseNotFound
                self._create(create)
            self._remove_stray_stores(name)
            kb = self.instance(self.manifest(name), writable=True)
            try:
                yield kb
            finally:
                kb.close()

    def _create(self, manifest: Manifest) -> None:
        directory = self.root / manifest.name
        shutil.rmtree(directory, ignore_errors=True)  # what a killed drop left (no manifest: not a knowledge base)
        store_dir = directory / manifest.store
        store_dir.mkdir(parents=True, exist_ok=True)
        ChunkStore(store_dir / STORE_DB, create=True).close()
        manifest.write(directory / MANIFEST)

    def _remove_stray_stores(self, name: str) -> None:
        """Delete store folders left by an interrupted rebuild (never the active one)."""
        active = self.manifest(name).store
        for path in (self.root / name).iterdir():
            if path.is_dir() and path.name.startswith("store-") and path.name != active:
                shutil.rmtree(path, ignore_errors=True)

    def replace_store(self, name: str, manifest: Manifest) -> None:
        """Make ``manifest`` (pointing at a fully built store) the active one. Call under ``lock``."""
        manifest.write(self.root / name / MANIFEST)
        self._remove_stray_stores(name)

    def drop(self, name: str) -> None:
        """Delete a knowledge base and everything in it."""
        with self.lock(name):
            directory = self.root / name
            self.manifest(name)
            # Remove the manifest first: a kill mid-way leaves no half knowledge base visible.
            (directory / MANIFEST).unlink()
            fsync_dir(directory)
            shutil.rmtree(directory, ignore_errors=True)
