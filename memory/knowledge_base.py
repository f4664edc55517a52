"""The catalogue of named knowledge bases, whichever backend holds each one.

Local knowledge bases live under ``<ZHIKU_HOME>/kb/``::

    <name>/manifest.json          what the knowledge base is: embedder, dimension, chunking, backend, active store
    <name>/<store>/...            the local backend's files (see ``memory.local_backend``)
    .locks/<name>.lock            held by the one writer

Milvus-held ones are listed in Milvus itself (``memory.milvus_backend``), so
every server pointed at the same Milvus sees the same ones. Milvus is consulted
when it is configured (``ZHIKU_VECTOR_STORE=milvus`` or ``ZHIKU_MILVUS_URI``) or
when embedded milvus-lite data exists under the home folder.

The manifest is written last on create and replaced atomically on rebuild, so a
half-created or half-rebuilt store is never the active one.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from memory.backend import (  # noqa: F401  (the names callers import from here)
    KB_NAME_RULE,
    DocumentUpdate,
    EmbedderMismatch,
    Hit,
    KnowledgeBase,
    KnowledgeBaseBusy,
    KnowledgeBaseError,
    KnowledgeBaseNotFound,
    KnowledgeBaseUnavailable,
    Manifest,
    join_without_overlap,
    validate_name,
)
from memory.chunk_store import ChunkStore, DocumentRecord
from memory.files import fsync_dir
from memory.local_backend import STORE_DB, LocalKnowledgeBase  # noqa: F401

MANIFEST = "manifest.json"


class KnowledgeBases:
    """The named knowledge bases: local ones under one root folder, and those in the configured Milvus."""

    def __init__(
        self,
        root: Path,
        *,
        exact_max: int = 200_000,
        milvus_exact_max: int = 20_000,
        nprobe: int = 32,
        lock_timeout: float = 0.0,
        index_save_interval: float = 30.0,
        default_backend: str = "local",
        milvus=None,
    ):
        self.root = root
        self._exact_max = exact_max
        self._milvus_exact_max = milvus_exact_max  # measured apart: Milvus' HNSW pays off sooner (bench.backends)
        self._nprobe = nprobe
        self._lock_timeout = lock_timeout
        self._index_save_interval = index_save_interval
        self.default_backend = default_backend
        self._milvus = milvus  # a MilvusConnection, or None when Milvus is not in use
        self._catalogue = None

    @classmethod
    def from_settings(cls, settings) -> "KnowledgeBases":
        return cls(
            settings.kb_root,
            exact_max=settings.exact_search_max_chunks,
            milvus_exact_max=settings.milvus_exact_search_max_chunks,
            nprobe=settings.ivf_nprobe,
            lock_timeout=settings.lock_timeout,
            index_save_interval=settings.index_save_interval,
            default_backend=settings.vector_store,
            milvus=milvus_connection(settings),
        )

    @property
    def milvus(self):
        """The MilvusConnection in use, or None."""
        return self._milvus

    def close(self) -> None:
        """Close the Milvus client, if one was opened (local knowledge bases hold nothing between calls)."""
        if self._milvus is not None:
            self._milvus.close()
            self._catalogue = None

    # ---- the Milvus half of the catalogue -------------------------------
    def catalogue(self):
        """The Milvus catalogue (:class:`KnowledgeBaseError` when Milvus is not configured)."""
        if self._milvus is None:
            raise KnowledgeBaseError("Milvus is not configured: set ZHIKU_VECTOR_STORE=milvus (and ZHIKU_MILVUS_URI for a server)")
        if self._catalogue is None:
            from memory.milvus_backend import MilvusCatalogue

            self._catalogue = MilvusCatalogue(self._milvus)
        return self._catalogue

    def _milvus_manifests(self) -> dict[str, Manifest]:
        return self.catalogue().manifests() if self._milvus is not None else {}

    def _local_manifest(self, name: str) -> Manifest | None:
        path = self.root / name / MANIFEST
        return Manifest.read(path) if path.is_file() else None

    def _find(self, name: str) -> Manifest | None:
        validate_name(name)
        local = self._local_manifest(name)
        if local is not None or self._milvus is None:
            return local
        return self.catalogue().manifest(name)

    # ---- looking up -------------------------------------------------------
    def names(self) -> list[str]:
        local = [p.name for p in self.root.iterdir() if (p / MANIFEST).is_file()] if self.root.is_dir() else []
        return sorted(set(local) | set(self._milvus_manifests()))

    def exists(self, name: str) -> bool:
        return self._find(name) is not None

    def manifest(self, name: str) -> Manifest:
        manifest = self._find(name)
        if manifest is None:
            known = ", ".join(self.names()) or "none yet"
            raise KnowledgeBaseNotFound(
                f"knowledge base {name!r} does not exist (known: {known}); create it with `ingest add PATH --kb {name}`"
            )
        return manifest

    def documents(self, name: str) -> list[DocumentRecord]:
        """The documents of ``name`` (for a local one, read from its chunk store alone: no index load)."""
        manifest = self.manifest(name)
        if manifest.backend == "local":
            store = ChunkStore(self.root / name / manifest.store / STORE_DB)
            try:
                return store.documents()
            finally:
                store.close()
        kb = self.instance(manifest, writable=False)
        try:
            return kb.documents()
        finally:
            kb.close()

    def open(self, name: str) -> KnowledgeBase:
        """Open for reading; sees committed state only."""
        return self.instance(self.manifest(name), writable=False)

    def instance(self, manifest: Manifest, *, writable: bool) -> KnowledgeBase:
        """A KnowledgeBase object for ``manifest`` (which may not be the active one yet)."""
        if manifest.backend == "milvus":
            from memory.milvus_backend import MilvusKnowledgeBase

            self.catalogue()  # refuses clearly when Milvus is not configured
            return MilvusKnowledgeBase(manifest, self._milvus, writable=writable, exact_max=self._milvus_exact_max)
        return LocalKnowledgeBase(
            self.root / manifest.name,
            manifest,
            writable=writable,
            exact_max=self._exact_max,
            nprobe=self._nprobe,
            index_save_interval=self._index_save_interval,
        )

    # ---- writing ----------------------------------------------------------
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
            manifest = self.manifest(name)
            self._remove_stray_stores(manifest)
            kb = self.instance(manifest, writable=True)
            try:
                yield kb
            finally:
                kb.close()

    def _create(self, manifest: Manifest) -> None:
        if manifest.backend == "milvus":
            self.catalogue().drop_stores(manifest.name)  # what a killed drop left
            self.instance(manifest, writable=True).close()  # its collections, before it is listed
            self.catalogue().put(manifest)
            return
        directory = self.root / manifest.name
        shutil.rmtree(directory, ignore_errors=True)  # what a killed drop left (no manifest: not a knowledge base)
        store_dir = directory / manifest.store
        store_dir.mkdir(parents=True, exist_ok=True)
        ChunkStore(store_dir / STORE_DB, create=True).close()
        manifest.write(directory / MANIFEST)

    def _remove_stray_stores(self, active: Manifest) -> None:
        """Delete stores left by an interrupted rebuild (never the active one)."""
        if active.backend == "milvus":
            self.catalogue().drop_stores(active.name, keep=active)
            return
        for path in (self.root / active.name).iterdir():
            if path.is_dir() and path.name.startswith("store-") and path.name != active.store:
                shutil.rmtree(path, ignore_errors=True)

    def replace_store(self, name: str, manifest: Manifest) -> None:
        """Make ``manifest`` (pointing at a fully built store) the active one. Call under ``lock``."""
        if manifest.backend == "milvus":
            self.catalogue().put(manifest)
        else:
            manifest.write(self.root / name / MANIFEST)
        self._remove_stray_stores(manifest)

    def drop(self, name: str) -> None:
        """Delete a knowledge base and everything in it."""
        with self.lock(name):
            manifest = self.manifest(name)
            # Unlist it first: a kill mid-way leaves no half knowledge base visible.
            if manifest.backend == "milvus":
                self.catalogue().remove(name)
                self.catalogue().drop_stores(name)
                return
            directory = self.root / name
            (directory / MANIFEST).unlink()
            fsync_dir(directory)
            shutil.rmtree(directory, ignore_errors=True)


def milvus_connection(settings):
    """The Milvus these settings use, or None when they use none."""
    embedded = settings.embedded_milvus
    if not (settings.milvus_uri or settings.vector_store == "milvus" or embedded.exists()):
        return None
    from memory.milvus_backend import MilvusConnection

    token = settings.milvus_token.get_secret_value() if settings.milvus_token else ""
    return MilvusConnection(settings.milvus_uri or str(embedded), token, settings.milvus_database)
