"""The vectors of one knowledge base, in a FAISS index keyed by chunk id.

Vectors are L2-normalised float32 embeddings and are compared by inner
product, so every score is the **cosine similarity** of query and chunk, in
[-1, 1], higher is better. Ids are int64 chunk ids chosen by the caller (the
chunk store's SQLite rowids); each id is present at most once.

Two kinds of index:

``"flat"``
    Exact search (``IndexIDMap2`` over ``IndexFlatIP``). Cost grows linearly:
    one query (dim 384, one thread) takes ~4 ms over 50k chunks, ~11 ms over
    100k and ~110 ms over 1M.
``"ivf<nlist>,flat"``
    Approximate search (``IndexIVFFlat``, inner product): the vectors are split
    into ``nlist`` clusters and a query scans the ``nprobe`` nearest ones.
    Supports removal, which HNSW does not. Over 1M chunks: ``ivf4000,flat``
    with nprobe 32 answers in ~1.3 ms at recall@10 0.99 against exact search;
    building it (k-means on 256k samples, then adding) takes ~2 minutes.

:meth:`VectorIndex.rebuilt_for_size` picks the kind from the number of chunks;
the defaults below come from ``python -m bench.search_scale`` (2 cores,
synthetic clustered embeddings; it writes ``bench/out/search_scale.md``).

Example::

    >>> import numpy as np
    >>> index = VectorIndex.create(3)
    >>> index.add(np.array([7, 9]), np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32))
    >>> scores, ids = index.search(np.array([[0.6, 0.8, 0]], dtype=np.float32), k=3)
    >>> ids.tolist(), [round(float(s), 2) for s in scores[0]]
    ([[9, 7, -1]], [0.8, 0.6, -inf])

Not safe for a write (add/remove) concurrent with anything else; concurrent
searches are fine. Callers hold the knowledge base's lock for writes.
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import faiss
import numpy as np

from memory.files import fsync_dir

# Defaults measured by bench/search_scale.py (2 cores, dim 384).
DEFAULT_EXACT_MAX = 50_000
"""Flat search up to this many chunks: flat p50 is 4.0-4.4 ms at 50k, 6.0-6.4 ms at 60k."""
DEFAULT_NPROBE = 32
"""Clusters scanned per query by IVF: recall@10 0.992 at 1M (16 gives only 0.964), p50 1.3 ms."""
NLIST_PER_SQRT_N = 4
"""An IVF index over n vectors gets ``4 * sqrt(n)`` clusters."""
MIN_POINTS_PER_LIST = 39
"""FAISS wants at least this many training points per cluster."""
TRAIN_POINTS_PER_LIST = 64
"""k-means trains on at most this many sampled vectors per cluster."""
SMALL_SEARCH = 20
"""Searches of fewer queries than this run on :attr:`VectorIndex.small_search_threads` threads."""
NORM_TOLERANCE = 1e-2
"""Largest accepted ``| ||v||^2 - 1 |`` for a vector said to be normalised."""
_FETCH_BATCH = 65_536


class VectorIndexError(Exception):
    """A vector index file is missing, unreadable, corrupt or unsupported, or could not be saved."""


def nlist_for_size(n: int) -> int:
    """Number of IVF clusters for ``n`` vectors: ``4 * sqrt(n)``, capped so each gets 39 training points.

    >>> nlist_for_size(1_000_000), nlist_for_size(200_000), nlist_for_size(1_000)
    (4000, 1789, 25)
    """
    ideal = round(NLIST_PER_SQRT_N * math.sqrt(max(n, 1)))
    return max(1, min(ideal, n // MIN_POINTS_PER_LIST))


def new_ivf(dimension: int, nlist: int) -> faiss.IndexIVFFlat:
    """An untrained inner-product IVF index whose k-means is spherical (unit centroids).

    >>> new_ivf(8, 4).is_trained
    False
    """
    quantizer = faiss.IndexFlatIP(dimension)
    index = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()  # the IVF index now frees its quantizer
    index.cp.spherical = True
    return index


def training_sample(vectors: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """At most ``64 * nlist`` rows of ``vectors``, drawn without replacement, in row order.

    >>> training_sample(np.zeros((1000, 2), np.float32), nlist=2).shape
    (128, 2)
    """
    n = len(vectors)
    size = min(n, TRAIN_POINTS_PER_LIST * nlist)
    if size == n:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def _check_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and ids.min() < 0:
        raise ValueError("chunk ids must be >= 0")
    return ids


def _check_vectors(vectors: np.ndarray, dimension: int, what: str) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors.reshape(1, -1)
    if vectors.ndim != 2 or vectors.shape[1] != dimension:
        raise ValueError(f"{what} must have shape (n, {dimension}), got {vectors.shape}")
    squared = np.einsum("ij,ij->i", vectors, vectors)
    if not np.all(np.abs(squared - 1.0) <= NORM_TOLERANCE):  # also rejects NaN
        raise ValueError(f"{what} must be L2-normalised (scores are cosine similarities)")
    return vectors


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    return index if isinstance(index, faiss.IndexIVF) else None


def _check_supported(index: faiss.Index) -> None:
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise VectorIndexError("index does not use inner product")
    if isinstance(index, faiss.IndexIDMap2):
        if isinstance(faiss.downcast_index(index.index), faiss.IndexFlat):
            return
    elif isinstance(index, faiss.IndexIVFFlat) and index.is_trained:
        return
    raise VectorIndexError(f"unsupported index type {type(index).__name__}")


@contextmanager
def _omp_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` OpenMP threads; the setting is per calling thread (libgomp)."""
    if threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class VectorIndex:
    """Cosine-similarity search over normalised vectors keyed by int64 chunk id.

    >>> index = VectorIndex.create(2)
    >>> index.add(np.array([1, 2]), np.array([[1, 0], [0, 1]], dtype=np.float32))
    >>> len(index), index.kind, index.ids().tolist()
    (2, 'flat', [1, 2])
    >>> index.remove(np.array([1, 5]))
    1
    """

    small_search_threads: int | None = 1
    """OpenMP threads for a search of fewer than 20 queries; ``None`` leaves FAISS's (all cores).

    One thread is measured faster for one query: flat over 1M vectors takes
    112 ms on 1 thread vs 317 ms on 2 (2 cores, other load), and IVF/HNSW
    gain nothing from more. Batch searches and builds keep all cores.
    """

    def __init__(self, index: faiss.Index) -> None:
        """Wrap a supported FAISS index; use :meth:`create` or :meth:`load` instead."""
        _check_supported(index)
        self._index = index
        self._sorted_ids: np.ndarray | None = None

    @classmethod
    def create(cls, dimension: int) -> "VectorIndex":
        """An empty exact (``"flat"``) index.

        >>> VectorIndex.create(384).kind
        'flat'
        """
        if dimension < 1:
            raise ValueError("dimension must be >= 1")
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dimension)))

    @classmethod
    def load(cls, path: Path) -> "VectorIndex":
        """Read an index written by :meth:`save`.

        Raises :class:`VectorIndexError` when the file is missing, truncated,
        has trailing bytes, or holds an index kind this module does not write.
        """
        path = Path(path)
        try:
            with open(path, "rb") as f:
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
                trailing = f.read(1)
        except FileNotFoundError as exc:
            raise VectorIndexError(f"no vector index at {path}") from exc
        except (OSError, RuntimeError, MemoryError, ValueError) as exc:
            raise VectorIndexError(f"corrupt vector index {path}: {exc}") from exc
        if trailing:
            raise VectorIndexError(f"corrupt vector index {path}: trailing bytes")
        return cls(index)

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file in the same folder, fsync, rename, fsync the folder.

        A crash or error leaves the previous file (if any) untouched and no
        temporary file behind (except after a power cut mid-write: a
        ``.<name>.*.tmp`` file that is safe to delete).
        """
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                faiss.write_index(self._index, faiss.PyCallbackIOWriter(f.write))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, (OSError, RuntimeError)):
                raise VectorIndexError(f"could not save vector index {path}: {exc}") from exc
            raise
        fsync_dir(path.parent)

    @property
    def dimension(self) -> int:
        """Length of every vector."""
        return self._index.d

    @property
    def kind(self) -> str:
        """``"flat"`` or ``"ivf<nlist>,flat"``."""
        ivf = _ivf_of(self._index)
        return "flat" if ivf is None else f"ivf{ivf.nlist},flat"

    @property
    def nprobe(self) -> int | None:
        """Clusters an IVF index scans per query (stored in the file); ``None`` for flat."""
        ivf = _ivf_of(self._index)
        return None if ivf is None else ivf.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        ivf = _ivf_of(self._index)
        if ivf is not None:
            ivf.nprobe = max(1, min(int(value), ivf.nlist))

    def __len__(self) -> int:
        return self._index.ntotal

    def __repr__(self) -> str:
        return f"VectorIndex(kind={self.kind!r}, dimension={self.dimension}, size={len(self)})"

    def ids(self) -> np.ndarray:
        """All ids present, sorted ascending (int64), e.g. to reconcile with the chunk store.

        >>> VectorIndex.create(2).ids().dtype
        dtype('int64')
        """
        return self._present().copy()

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors[i]`` under ``ids[i]``.

        Raises ``ValueError`` for a shape mismatch, vectors that are not
        normalised, negative ids, or ids repeated or already present (remove
        a chunk's old vector before re-adding it).
        """
        ids = _check_ids(ids)
        vectors = _check_vectors(vectors, self.dimension, "vectors")
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        unique = np.unique(ids)
        if len(unique) != len(ids):
            raise ValueError("ids repeat within the batch")
        present = self._present()
        clash = unique[np.isin(unique, present, assume_unique=True)]
        if clash.size:
            raise ValueError(f"{clash.size} ids already present, e.g. {int(clash[0])}")
        if not len(ids):
            return
        self._index.add_with_ids(vectors, ids)
        self._sorted_ids = np.union1d(present, unique)

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (absent ones are ignored); returns how many were removed.

        Costs one pass over the index, so remove in batches, not one by one.
        """
        ids = np.unique(_check_ids(ids))
        present = self._present()
        ids = ids[np.isin(ids, present, assume_unique=True)]
        if not ids.size:
            return 0
        removed = int(self._index.remove_ids(ids))
        self._sorted_ids = np.setdiff1d(present, ids, assume_unique=True)
        return removed

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best chunks for each normalised query: ``(scores, ids)``, both shaped ``(nq, k)``.

        Rows are best first; scores are cosine similarities (float32). When
        fewer than ``k`` chunks are found, the row ends with id ``-1`` and
        score ``-inf``. A 1-D query is treated as one row.
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        queries = _check_vectors(queries, self.dimension, "queries")
        threads = self.small_search_threads if len(queries) < SMALL_SEARCH else None
        with _omp_threads(threads):
            scores, ids = self._index.search(queries, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    def rebuilt_for_size(
        self,
        fetch_all: Callable[[], tuple[np.ndarray, np.ndarray]],
        exact_max: int = DEFAULT_EXACT_MAX,
        nprobe: int = DEFAULT_NPROBE,
    ) -> "VectorIndex":
        """``self`` if its kind suits ``len(self)``, else a new index filled from ``fetch_all() -> (ids, vectors)``.

        Flat suits up to ``exact_max`` chunks. IVF suits above ``exact_max // 2``
        (so a knowledge base hovering at the threshold does not flip back and
        forth) while its ``nlist`` is within a factor 2 of
        :func:`nlist_for_size`; beyond that it is retrained. An IVF ``self``
        that suits gets ``nprobe`` set. A rebuild holds the fetched vectors,
        the old and the new index in memory at once (3 x 1.5 GB at 1M x 384).

        >>> index = VectorIndex.create(2)
        >>> index.rebuilt_for_size(lambda: None, exact_max=10) is index
        True
        """
        if self._suits(len(self), exact_max):
            self.nprobe = nprobe
            return self
        ids, vectors = fetch_all()
        ids = _check_ids(ids)
        vectors = _check_vectors(vectors, self.dimension, "vectors")
        if len(ids) <= exact_max:
            rebuilt = VectorIndex.create(self.dimension)
        else:
            rebuilt = VectorIndex._trained_ivf(vectors, nlist_for_size(len(ids)))
            rebuilt.nprobe = nprobe
        rebuilt.add(ids, vectors)
        return rebuilt

    @classmethod
    def _trained_ivf(cls, vectors: np.ndarray, nlist: int) -> "VectorIndex":
        index = new_ivf(vectors.shape[1], nlist)
        index.train(training_sample(vectors, nlist))
        return cls(index)

    def _suits(self, n: int, exact_max: int) -> bool:
        ivf = _ivf_of(self._index)
        if ivf is None:
            return n <= exact_max
        ideal = nlist_for_size(n)
        return n > exact_max // 2 and ideal / 2 <= ivf.nlist <= ideal * 2

    def _present(self) -> np.ndarray:
        if self._sorted_ids is None:
            self._sorted_ids = np.sort(self._raw_ids())
        return self._sorted_ids

    def _raw_ids(self) -> np.ndarray:
        ivf = _ivf_of(self._index)
        if ivf is None:
            return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        lists = ivf.invlists
        parts = []
        for list_no in range(ivf.nlist):
            size = lists.list_size(list_no)
            if size:
                pointer = lists.get_ids(list_no)
                parts.append(faiss.rev_swig_ptr(pointer, size).copy())
                lists.release_ids(list_no, pointer)
        return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.empty(0, np.int64)


def reconcile(
    index: VectorIndex,
    store_ids: np.ndarray,
    fetch_vectors: Callable[[np.ndarray], np.ndarray],
) -> tuple[int, int]:
    """Make ``index.ids()`` equal ``store_ids``; returns ``(added, removed)``.

    Used after a crash, when the saved index is older than the chunk store:
    ids absent from the store are removed, and store ids missing from the
    index are added with vectors from ``fetch_vectors(ids)`` (called in
    batches of 65,536 ids, rows in the order asked). Vectors of ids present in
    both are trusted, so the store must never reuse a chunk id.

    >>> index = VectorIndex.create(2)
    >>> index.add(np.array([1]), np.array([[1, 0]], dtype=np.float32))
    >>> reconcile(index, np.array([2]), lambda ids: np.tile([[0, 1]], (len(ids), 1)).astype(np.float32))
    (1, 1)
    """
    store = np.unique(_check_ids(store_ids))
    have = index.ids()
    removed = index.remove(np.setdiff1d(have, store, assume_unique=True))
    missing = np.setdiff1d(store, have, assume_unique=True)
    for start in range(0, len(missing), _FETCH_BATCH):
        batch = missing[start : start + _FETCH_BATCH]
        index.add(batch, fetch_vectors(batch))
    return len(missing), removed
