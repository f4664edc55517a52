"""The local backend: one knowledge base in one folder.

Layout of ``<ZHIKU_HOME>/kb/<name>/<store>/``::

    chunks.sqlite              documents, chunks and vectors (the source of truth)
    vectors.<generation>.faiss the FAISS copy of the vectors
    lexical.<generation>/      the BM25 index over the chunks' stored tokens

Crash safety: every write is one SQLite transaction that bumps the store's
*generation*; the FAISS file and the BM25 folder are derived from the store and
saved atomically under the generation they reflect (one mechanism for both:
``memory.saved_generations``). Opening a knowledge base whose newest FAISS file is older than the
store brings it in step (removing and adding the differing chunk ids), so a kill
at any moment leaves a loadable, consistent knowledge base.

The BM25 index is rebuilt from the tokens stored with each chunk
(cheap: no tokeniser runs) whenever the newest saved folder is older than the
store; writers save it when they close, readers only build it in memory. It is
built lazily, on the first lexical search, so dense-only work never pays for it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from memory.backend import DocumentUpdate, Hit, KnowledgeBase, Manifest
from memory.chunk_store import ChunkRecord, ChunkStore, DocumentRecord
from memory.lexical_index import LexicalIndex, LexicalIndexError, tokenize
from memory.saved_generations import SavedGenerations

if TYPE_CHECKING:
    from memory.vector_index import VectorIndex

STORE_DB = "chunks.sqlite"


class LocalKnowledgeBase(KnowledgeBase):
    """A knowledge base in one folder: its SQLite chunk store, with the FAISS and BM25 indexes derived from it."""

    def __init__(
        self, directory: Path, manifest: Manifest, *, writable: bool, exact_max: int, nprobe: int, index_save_interval: float = 30.0
    ):
        super().__init__(manifest, writable=writable)
        self.directory = directory
        self._index_save_interval = index_save_interval
        self._exact_max = exact_max
        self._nprobe = nprobe
        if writable:
            self.store_dir.mkdir(parents=True, exist_ok=True)
        self.store = ChunkStore(self.store_dir / STORE_DB, create=writable)
        self.saved_vectors = SavedGenerations(self.store_dir, "vectors", ".faiss")
        self.saved_lexical = SavedGenerations(self.store_dir, "lexical")
        self._index: VectorIndex | None = None  # loaded on first use, see ``index``
        self._index_generation = -1  # the store generation the loaded index reflects
        self._lexical: LexicalIndex | None = None
        self._lexical_generation = -1
        self._index_saved_at = time.monotonic()

    @property
    def store_dir(self) -> Path:
        return self.directory / self.manifest.store

    def close(self) -> None:
        if self.writable:
            self.save_index()
            if not self.saved_lexical.path(self.store.generation()).is_dir():
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
        from memory.vector_index import VectorIndex, VectorIndexError, reconcile

        with self.store.snapshot():
            generation = self.store.generation()
            if self._index is not None and generation == self._index_generation:
                return False
            newest = self.saved_vectors.load_newest(generation, VectorIndex.load, VectorIndexError)
            saved_generation, index = newest or (-1, VectorIndex.create(self.manifest.dimension))
            if saved_generation != generation:
                reconcile(index, self.store.chunk_ids(), self._vectors_of)
            self._index = index.rebuilt_for_size(self._all_vectors, self._exact_max, self._nprobe)
            self._index_generation = generation
        return True

    def _vectors_of(self, ids: np.ndarray) -> np.ndarray:
        return self.store.vectors(ids, self.manifest.dimension)

    def _all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return self.store.all_vectors(self.manifest.dimension)

    def save_index(self) -> None:
        """Save the index under its generation and drop older copies (writers only)."""
        if not self.writable or self._index is None:  # never loaded: nothing changed it
            return
        self.saved_vectors.save(self._index_generation, self.index.save)
        self._index_saved_at = time.monotonic()

    # ---- the lexical (BM25) index ----------------------------------------
    def lexical_index(self) -> LexicalIndex:
        """The BM25 index at the store's latest commit, loaded or rebuilt from stored tokens."""
        with self.store.snapshot():
            generation = self.store.generation()
            if generation != self._lexical_generation or self._lexical is None:
                saved = self.saved_lexical.load_exactly(generation, LexicalIndex.load, LexicalIndexError)
                self._lexical = saved or LexicalIndex.build_streaming(self.store.iter_tokens())
                self._lexical_generation = generation
        return self._lexical

    def save_lexical(self) -> None:
        """Save the BM25 index under the store's generation; drop older and half-written copies (writers only)."""
        if not self.writable:
            return
        index, generation = self.lexical_index(), self._lexical_generation

        def readable(path: Path) -> bool:  # a corrupt copy at this generation is replaced, not kept
            return self.saved_lexical.load_exactly(generation, LexicalIndex.load, LexicalIndexError) is not None

        self.saved_lexical.save(generation, index.save, usable=readable)

    def lexical_search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` chunks with the best BM25 score for ``query``: (chunk id, score), best first."""
        return self.lexical_index().search(tokenize(query), k)

    # ---- writing -------------------------------------------------------
    def put_documents(self, updates: list[DocumentUpdate]) -> None:
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
                    ocr_pages=update.ocr_pages,
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

    # ---- reading -------------------------------------------------------
    def search(self, query_vector: np.ndarray, top_k: int) -> list[Hit]:
        """The ``top_k`` chunks most similar to one normalised query vector, best first."""
        if len(self.index) == 0:
            return []
        scores, ids = self.index.search(np.asarray(query_vector, dtype=np.float32).reshape(1, -1), top_k)
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        records = self.store.chunks(i for i, _ in pairs)
        return [Hit(records[i], s) for i, s in pairs if i in records]

    def documents(self) -> list[DocumentRecord]:
        return self.store.documents()

    def document(self, path: str) -> DocumentRecord | None:
        return self.store.document(path)

    def chunks(self, ids: Iterable[int]) -> dict[int, ChunkRecord]:
        return self.store.chunks(ids)

    def chunks_of_document(self, document_id: int, first: int, last: int) -> list[ChunkRecord]:
        return self.store.chunks_of_document(document_id, first, last)

    def vectors_by_text(self, text_shas: Iterable[str]) -> dict[str, np.ndarray]:
        return self.store.vectors_by_text(text_shas)

    def chunk_count(self) -> int:
        return self.store.chunk_count()

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
