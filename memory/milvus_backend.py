"""The Milvus backend: a knowledge base held entirely in Milvus, so servers keep no state of their own.

Several ``rag serve`` replicas pointed at one Milvus (``ZHIKU_MILVUS_URI``) see
the same knowledge bases: the catalogue of manifests, each knowledge base's
document registry and its chunks all live there, in three kinds of collection:

``zhiku_catalogue``
    one row per knowledge base: its name and manifest (JSON).
``<prefix>_documents``
    the document registry: path, sha256, size, status, error, chunk count, and
    a write *state* (``writing``, ``done``, ``deleting``).
``<prefix>_chunks``
    text, document id, ordinal, pages, offsets, the dense vector (inner product
    = cosine) and a BM25 sparse vector that Milvus computes from the text with
    its jieba analyzer.

Milvus has no multi-row transactions, so writes follow an order that readers
can always make sense of. Replacing a document writes a *new* registry row
(new id) in state ``writing``, then its chunks, then flips the row to ``done``,
and only then deletes the old version's chunks and row. Deleting marks the row
``deleting`` before its chunks go. Readers take, for each path, the newest
``done`` row and ignore every chunk of any other row, so a kill at any moment
leaves a knowledge base that searches correctly (the old version or the new
one, never a mix); the next writer deletes what the killed one left.

Chunk ids are ``document id * 2**20 + ordinal``; document ids are random, so replicas
uploading to one knowledge base at once never collide, and a path's version in use is the
newest by the time its writing began.
Embedded milvus-lite (a local folder, no ``milvus_uri``) serves one process at
a time: share a knowledge base between processes through a Milvus server
(``milvus-lite server --data-dir DIR --port 19530`` is one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import string
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from memory.backend import DocumentUpdate, Hit, KnowledgeBase, KnowledgeBaseError, KnowledgeBaseUnavailable, Manifest
from memory.chunk_store import ChunkRecord, DocumentRecord

CATALOGUE = "zhiku_catalogue"
ORDINALS_PER_DOCUMENT = 2**20
_BATCH = 1000
_ITERATOR_BATCH = 8000
_STAMP_ID = 0  # the registry row whose value changes with every write (document ids start at 1)
_PLACEHOLDER = [1.0, 0.0]  # Milvus wants a vector field in every collection; registry rows carry this one
_CHUNK_FIELDS = ["id", "document_id", "ordinal", "text", "text_sha", "pages", "start", "end"]
_DOCUMENT_FIELDS = ["id", "path", "sha256", "size", "status", "error", "chunk_count", "state", "started_at"]
# Registries made before OCR lack this field (milvus-lite cannot add a field to a collection):
# there, pages read by OCR go unrecorded.
_OCR_FIELD = "ocr_pages"
WRITING_LEASE_S = 900.0
"""A version still ``writing`` after this long was abandoned by a killed writer (on a shared Milvus,
where another replica may be writing right now; embedded milvus-lite has one writer and repairs at once)."""
# jieba emits punctuation as tokens; BM25 over "，" and "。" ranks every chunk alike (the local tokenizer drops them too)
PUNCTUATION = sorted(set(string.punctuation) | set("，。、；：？！“”‘’（）《》【】〔〕—…·「」『』〈〉～￥　"))
ANALYZER = {"tokenizer": "jieba", "filter": [{"type": "stop", "stop_words": PUNCTUATION}]}
INDEX_DROP_WAIT_S = 300.0
"""How long a writer waits for Milvus to finish dropping an index it replaces."""
INDEX_BUILD_WAIT_S = 7200.0
"""How long a writer waits for Milvus to build a replacing index (HNSW over a million chunks: minutes)."""
HNSW_EF = 128
"""Candidates HNSW explores per query (above ``exact_max`` chunks)."""


def _milvus_errors():
    from pymilvus.exceptions import MilvusException

    return (MilvusException, ConnectionError, TimeoutError, OSError)


class MilvusConnection:
    """One client for one Milvus, opened on first use; every failure to reach it becomes KnowledgeBaseUnavailable."""

    def __init__(self, uri: str, token: str = "", database: str = "", timeout: float = 10.0):
        self.uri = uri
        self._token = token
        self._database = database
        self._timeout = timeout
        self._client = None
        self._embedded_lock = None
        self._loaded: set[str] = set()

    def call(self, method: str, *args, **kwargs):
        """``client.<method>(...)``, with Milvus errors worded for the user."""
        try:
            return getattr(self.client(), method)(*args, **kwargs)
        except _milvus_errors() as exc:
            raise KnowledgeBaseUnavailable(f"Milvus at {self.uri} failed ({method}): {_reason(exc)}") from None

    def client(self):
        if self._client is None:
            # gRPC's C core prints keepalive notices (GOAWAY "too_many_pings") on long runs; errors reach users via call()
            os.environ.setdefault("GRPC_VERBOSITY", "NONE")
            from pymilvus import MilvusClient

            # pymilvus logs every failed call with a traceback; the errors reach the user through call() instead
            logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
            if self.embedded:  # embedded milvus-lite serves from this process: keep its noise quiet
                import jieba

                jieba.setLogLevel(logging.WARNING)  # its dictionary banner
                logging.getLogger("grpc._server").setLevel(logging.CRITICAL)  # "AllocTimestamp not implemented", harmless
            self._hold_embedded()
            try:
                self._client = MilvusClient(uri=self.uri, token=self._token, db_name=self._database, timeout=self._timeout)
            except _milvus_errors() as exc:
                raise KnowledgeBaseUnavailable(
                    f"cannot reach Milvus at {self.uri}: {_reason(exc)}; start it, or check ZHIKU_MILVUS_URI"
                ) from None
        return self._client

    @property
    def embedded(self) -> bool:
        """milvus-lite inside this process (a local path), not a server."""
        return "://" not in self.uri

    def _hold_embedded(self) -> None:
        """Embedded milvus-lite runs inside this process: refuse a second process rather than let two write one folder."""
        if not self.embedded:
            return
        from filelock import FileLock, Timeout

        # one lock object per path in this process, counting its connections across threads
        lock = FileLock(f"{self.uri}.lock", is_singleton=True, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise KnowledgeBaseUnavailable(
                f"the embedded Milvus in {self.uri} is in use by another process; to share knowledge bases between "
                "processes, run a Milvus server (e.g. `milvus-lite server --data-dir DIR --port 19530`) and set "
                "ZHIKU_MILVUS_URI=http://127.0.0.1:19530"
            ) from None
        self._embedded_lock = lock

    def load(self, collection: str) -> None:
        """Load ``collection`` into memory once per connection (Milvus leaves collections released after a restart)."""
        if collection not in self._loaded:
            self.call("load_collection", collection)
            self._loaded.add(collection)

    def close(self) -> None:
        self._loaded.clear()
        if self._client is not None:
            try:
                self._client.close()
            except _milvus_errors():
                pass
            self._client = None
        self._release_embedded()

    def _release_embedded(self) -> None:
        """Stop the embedded server when the last connection of this process to it closes, so another process may open it."""
        if self._embedded_lock is None:
            return
        lock, self._embedded_lock = self._embedded_lock, None
        lock.release()
        if not lock.is_locked:  # the lock counts this process's connections to the file
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.uri)

    def query_all(self, collection: str, filter: str, fields: list[str]) -> list[dict]:
        """Every row matching ``filter``: one query's window is capped (16,384 rows) and returns rows in no
        particular order, so this reads through a query iterator."""
        rows: list[dict] = []
        iterator = self.call("query_iterator", collection, batch_size=_ITERATOR_BATCH, filter=filter, output_fields=fields)
        try:
            while True:
                try:
                    page = iterator.next()
                except _milvus_errors() as exc:
                    raise KnowledgeBaseUnavailable(f"Milvus at {self.uri} failed (query): {_reason(exc)}") from None
                if not page:
                    return rows
                rows += page
        finally:
            iterator.close()


def _reason(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def _id_list(ids: Iterable[int]) -> str:
    return "[" + ",".join(str(int(i)) for i in ids) + "]"


def _string_list(values: Iterable[str]) -> str:
    return json.dumps(list(values), ensure_ascii=False)


def collection_prefix(manifest: Manifest) -> str:
    """Collection-name prefix of one knowledge base: Milvus names are ASCII, knowledge-base names need not be."""
    return f"zhiku_{name_hash(manifest.name)}_{manifest.store.replace('-', '_')}"


def name_hash(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:16]


class MilvusCatalogue:
    """The manifests of the Milvus-held knowledge bases, in the ``zhiku_catalogue`` collection."""

    def __init__(self, connection: MilvusConnection):
        self.connection = connection
        self._ready = False

    def _ensure(self) -> None:
        if self._ready:
            return
        if not self.connection.call("has_collection", CATALOGUE):
            from pymilvus import DataType

            schema = self.connection.call("create_schema", auto_id=False)
            schema.add_field("name", DataType.VARCHAR, is_primary=True, max_length=512)
            schema.add_field("manifest", DataType.VARCHAR, max_length=8192)
            schema.add_field("placeholder", DataType.FLOAT_VECTOR, dim=2)
            index = self.connection.call("prepare_index_params")
            index.add_index("placeholder", index_type="FLAT", metric_type="IP")
            self.connection.call("create_collection", CATALOGUE, schema=schema, index_params=index, consistency_level="Strong")
        self.connection.load(CATALOGUE)
        self._ready = True

    def manifests(self) -> dict[str, Manifest]:
        self._ensure()
        rows = self.connection.query_all(CATALOGUE, 'name != ""', ["name", "manifest"])
        return {row["name"]: Manifest.from_json(row["manifest"]) for row in rows}

    def manifest(self, name: str) -> Manifest | None:
        self._ensure()
        rows = self.connection.call("query", CATALOGUE, filter=f"name == {json.dumps(name, ensure_ascii=False)}", output_fields=["manifest"])
        return Manifest.from_json(rows[0]["manifest"]) if rows else None

    def put(self, manifest: Manifest) -> None:
        self._ensure()
        row = {"name": manifest.name, "manifest": manifest.to_json(), "placeholder": _PLACEHOLDER}
        self.connection.call("upsert", CATALOGUE, [row])

    def remove(self, name: str) -> None:
        self._ensure()
        self.connection.call("delete", CATALOGUE, filter=f"name == {json.dumps(name, ensure_ascii=False)}")

    def drop_stores(self, name: str, keep: Manifest | None = None) -> None:
        """Drop the collections of ``name``'s stores other than ``keep``'s (what an interrupted rebuild or drop left)."""
        prefix = f"zhiku_{name_hash(name)}_"
        kept = collection_prefix(keep) if keep is not None else None
        for collection in self.connection.call("list_collections"):
            if collection.startswith(prefix) and not collection.startswith(f"{kept}_"):
                self.connection.call("drop_collection", collection)


@dataclass(frozen=True)
class _Row(DocumentRecord):
    """One registry row: a document version and where its writing stands."""

    state: str = "done"  # writing, done or deleting
    started_at: float = 0.0  # when this version began to be written: a path's newest done version is the one in use

    @classmethod
    def of(cls, row: dict) -> "_Row":
        return cls(
            int(row["id"]), row["path"], row["sha256"] or None, None if row["size"] < 0 else int(row["size"]),
            row["status"], row["error"] or None, int(row["chunk_count"]),
            ocr_pages=tuple(json.loads(row.get(_OCR_FIELD) or "[]")), state=row["state"], started_at=float(row["started_at"]),
        )  # fmt: skip

    def newer_than(self, other: "_Row") -> bool:
        return (self.started_at, self.id) > (other.started_at, other.id)

    def with_state(self, state: str) -> "_Row":
        return replace(self, state=state)

    def fields(self) -> dict:
        return {
            "id": self.id, "path": self.path, "sha256": self.sha256 or "", "size": -1 if self.size is None else self.size,
            "status": self.status, "error": (self.error or "")[:4000], "chunk_count": self.chunk_count, "state": self.state,
            "started_at": self.started_at, "placeholder": _PLACEHOLDER, _OCR_FIELD: json.dumps(list(self.ocr_pages)),
        }  # fmt: skip

    def record(self) -> DocumentRecord:
        return DocumentRecord(
            self.id, self.path, self.sha256, self.size, self.status, self.error, self.chunk_count, self.ocr_pages
        )


class MilvusKnowledgeBase(KnowledgeBase):
    """A knowledge base in two Milvus collections (documents and chunks); see the module docstring."""

    def __init__(self, manifest: Manifest, connection: MilvusConnection, *, writable: bool, exact_max: int):
        super().__init__(manifest, writable=writable)
        self.connection = connection
        self._exact_max = exact_max
        prefix = collection_prefix(manifest)
        self.documents_collection = f"{prefix}_documents"
        self.chunks_collection = f"{prefix}_chunks"
        self._live: dict[str, _Row] = {}  # path -> the row readers use
        self._stale: set[int] = set()  # ids of every other row: their chunks are invisible
        self._by_id: dict[int, _Row] = {}
        self._stamp: float | None = None  # the registry's stamp when this object last read it
        self._writing: dict[int, float] = {}  # id -> started_at of versions still being written
        self._abandoned_before = 0.0
        self._registry_read = False
        self._ocr_field: bool | None = None  # whether the registry records OCR'd pages (asked once)
        if writable:
            self._create_collections()
            self.refresh()
            self._repair()

    # ---- collections -----------------------------------------------------
    def _create_collections(self) -> None:
        from pymilvus import DataType, Function, FunctionType

        call = self.connection.call
        if not call("has_collection", self.documents_collection):
            schema = call("create_schema", auto_id=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("path", DataType.VARCHAR, max_length=8192)
            schema.add_field("sha256", DataType.VARCHAR, max_length=64)
            schema.add_field("size", DataType.INT64)
            schema.add_field("status", DataType.VARCHAR, max_length=16)
            schema.add_field("error", DataType.VARCHAR, max_length=16384)
            schema.add_field("chunk_count", DataType.INT64)
            schema.add_field("state", DataType.VARCHAR, max_length=16)
            schema.add_field("started_at", DataType.DOUBLE)
            schema.add_field(_OCR_FIELD, DataType.VARCHAR, max_length=8192)
            schema.add_field("placeholder", DataType.FLOAT_VECTOR, dim=2)
            index = call("prepare_index_params")
            index.add_index("placeholder", index_type="FLAT", metric_type="IP")
            call("create_collection", self.documents_collection, schema=schema, index_params=index, consistency_level="Strong")
        if not call("has_collection", self.chunks_collection):
            schema = call("create_schema", auto_id=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("document_id", DataType.INT64)
            schema.add_field("ordinal", DataType.INT64)
            schema.add_field(
                "text", DataType.VARCHAR, max_length=65535, enable_analyzer=True, analyzer_params=ANALYZER
            )
            schema.add_field("text_sha", DataType.VARCHAR, max_length=64)
            schema.add_field("pages", DataType.VARCHAR, max_length=4096)
            schema.add_field("start", DataType.INT64)
            schema.add_field("end", DataType.INT64)
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.manifest.dimension)
            schema.add_function(
                Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["text"], output_field_names=["sparse"])
            )
            index = call("prepare_index_params")
            index.add_index("vector", index_type="FLAT", metric_type="IP")
            index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            call("create_collection", self.chunks_collection, schema=schema, index_params=index, consistency_level="Strong")

    def close(self) -> None:
        if self.writable:
            self._fit_index()
            # sealed segments: milvus-lite searches rows still in its write buffer ~25x slower (docs/BENCHMARKS.md)
            self.connection.call("flush", self.documents_collection)
            self.connection.call("flush", self.chunks_collection)

    def _fit_index(self) -> None:
        """Exact search up to ``exact_max`` chunks, HNSW above (back to exact below half of it)."""
        call = self.connection.call
        chunks = self.chunk_count()
        current = self._vector_index().get("index_type", "FLAT")
        wanted = "HNSW" if chunks > self._exact_max or (current == "HNSW" and chunks > self._exact_max // 2) else "FLAT"
        if wanted == current:
            return
        call("release_collection", self.chunks_collection)
        call("drop_index", self.chunks_collection, "vector")
        self._await_no_vector_index()
        self._build_vector_index(wanted)
        call("load_collection", self.chunks_collection)

    def _build_vector_index(self, index_type: str) -> None:
        """Start the build and wait for it here: pymilvus' own wait re-sends ``create_index`` when one of its
        polls fails, and on a million chunks the re-sent call failed with "index already exists"."""
        call = self.connection.call
        index = call("prepare_index_params")
        params = {"M": 16, "efConstruction": 200} if index_type == "HNSW" else {}
        index.add_index("vector", index_type=index_type, metric_type="IP", params=params)
        try:
            call("create_index", self.chunks_collection, index, sync=False)
        except KnowledgeBaseUnavailable:
            if self._vector_index().get("index_type") != index_type:
                raise
        self._await_vector_index_built()

    def _vector_index(self) -> dict:
        return self.connection.call("describe_index", self.chunks_collection, "vector") or {}

    def _await_vector_index_built(self) -> None:
        started = time.monotonic()
        while True:
            try:
                described = self._vector_index()
            except KnowledgeBaseUnavailable:  # a busy milvus-lite can miss a poll while it builds
                described = {}
            if described.get("state") == "Failed":
                raise KnowledgeBaseUnavailable(
                    f"Milvus at {self.connection.uri} failed to build the index of {self.chunks_collection}; "
                    "run the command again"
                )
            if described.get("state") == "Finished":
                return
            if time.monotonic() - started > INDEX_BUILD_WAIT_S:
                raise KnowledgeBaseUnavailable(
                    f"Milvus at {self.connection.uri}: the index of {self.chunks_collection} was not built "
                    f"within {INDEX_BUILD_WAIT_S:.0f} s; run the command again"
                )
            time.sleep(1.0)

    def _await_no_vector_index(self) -> None:
        """Wait for a dropped index to be gone: on a million chunks milvus-lite still listed it when
        ``drop_index`` returned, and the next ``create_index`` failed with "index already exists"."""
        started = time.monotonic()
        asked = started
        while self.connection.call("list_indexes", self.chunks_collection, field_name="vector"):
            now = time.monotonic()
            if now - started > INDEX_DROP_WAIT_S:
                raise KnowledgeBaseUnavailable(
                    f"Milvus at {self.connection.uri}: the old index of {self.chunks_collection} was not dropped "
                    f"within {INDEX_DROP_WAIT_S:.0f} s; run the command again"
                )
            if now - asked > 10:  # a drop refused while the index was still building: ask again
                self.connection.call("drop_index", self.chunks_collection, "vector")
                asked = now
            time.sleep(0.2)

    # ---- the registry ----------------------------------------------------
    def _records_ocr(self) -> bool:
        """Whether this registry has the ocr_pages field (those made before OCR do not)."""
        if self._ocr_field is None:
            described = self.connection.call("describe_collection", self.documents_collection)
            self._ocr_field = any(f["name"] == _OCR_FIELD for f in described["fields"])
        return self._ocr_field

    def _upsert_rows(self, rows: list[_Row]) -> None:
        fields = [row.fields() for row in rows]
        if not self._records_ocr():
            for row in fields:
                del row[_OCR_FIELD]
        self.connection.call("upsert", self.documents_collection, fields)

    def refresh(self) -> bool:
        """Re-read the registry when a writer has changed it since (its stamp row says so): one primary-key
        lookup per request, not a read of every document."""
        self.connection.load(self.documents_collection)
        self.connection.load(self.chunks_collection)
        stamp = self._read_stamp()  # before the registry: a write after this read changes the stamp again
        if self._registry_read and stamp == self._stamp:
            return False
        self._stamp = stamp
        fields = _DOCUMENT_FIELDS + ([_OCR_FIELD] if self._records_ocr() else [])
        rows = [_Row.of(r) for r in self.connection.query_all(self.documents_collection, f"id != {_STAMP_ID}", fields)]
        live: dict[str, _Row] = {}
        for row in rows:
            if row.state == "done" and (row.path not in live or row.newer_than(live[row.path])):
                live[row.path] = row
        changed = not self._registry_read or live != self._live
        self._live = live
        live_ids = {row.id for row in live.values()}
        self._stale = {row.id for row in rows if row.id not in live_ids}
        self._by_id = {row.id: row for row in live.values()}
        self._abandoned_before = time.time() - (0 if self.connection.embedded else WRITING_LEASE_S)
        self._writing = {row.id: row.started_at for row in rows if row.state == "writing"}
        self._registry_read = True
        return changed

    def _read_stamp(self) -> float | None:
        rows = self.connection.call("get", self.documents_collection, ids=[_STAMP_ID], output_fields=["started_at"])
        return float(rows[0]["started_at"]) if rows else None

    def _bump_stamp(self) -> None:
        """Tell readers the set of done versions changed (after it did, before old chunks go)."""
        self._stamp = float(secrets.randbits(52))
        row = _Row(_STAMP_ID, "", None, None, "", None, 0, state="stamp", started_at=self._stamp)
        self._upsert_rows([row])

    def _ensure_registry_read(self) -> None:
        if not self._registry_read:
            self.refresh()

    def _repair(self) -> None:
        """Delete what killed writers left: superseded and half-deleted versions, and abandoned half-written ones
        (chunks first). A version another replica is writing right now is left alone."""
        doomed = {i for i in self._stale if self._writing.get(i, 0.0) <= self._abandoned_before}
        if doomed:
            self._delete_rows(sorted(doomed))
            self._stale -= doomed

    def _new_document_id(self) -> int:
        """A random id: replicas writing one knowledge base at once never pick the same (2**42 ids, so chunk ids fit int64)."""
        while True:
            candidate = secrets.randbits(42) + 1
            if candidate not in self._by_id and candidate not in self._stale:
                return candidate

    def _delete_rows(self, ids: list[int]) -> None:
        """Chunks before rows: a chunk is never left without the row that tells readers to ignore it."""
        for start in range(0, len(ids), _BATCH):
            batch = _id_list(ids[start : start + _BATCH])
            self.connection.call("delete", self.chunks_collection, filter=f"document_id in {batch}")
            self.connection.call("delete", self.documents_collection, filter=f"id in {batch}")

    def documents(self) -> list[DocumentRecord]:
        self._ensure_registry_read()
        return [row.record() for _, row in sorted(self._live.items())]

    def document(self, path: str) -> DocumentRecord | None:
        self._ensure_registry_read()
        row = self._live.get(path)
        return row.record() if row else None

    def chunk_count(self) -> int:
        self._ensure_registry_read()
        return sum(row.chunk_count for row in self._live.values())

    # ---- writing ---------------------------------------------------------
    def put_documents(self, updates: list[DocumentUpdate]) -> None:
        self._require_writable()
        self._ensure_registry_read()
        new_rows = []
        for update in updates:
            if len(update.chunks) >= ORDINALS_PER_DOCUMENT:
                raise KnowledgeBaseError(f"{update.path}: more than {ORDINALS_PER_DOCUMENT:,} chunks in one document")
            new_rows.append(
                _Row(
                    self._new_document_id(), update.path, update.sha256, update.size, update.status, update.error,
                    len(update.chunks), update.ocr_pages, state="writing", started_at=time.time(),
                )  # fmt: skip
            )
        old = [self._live[u.path].id for u in updates if u.path in self._live]
        call = self.connection.call
        self._upsert_rows(new_rows)
        self._insert_chunks(new_rows, updates)
        done = [row.with_state("done") for row in new_rows]
        self._upsert_rows(done)
        for row in done:
            self._live[row.path] = row
            self._by_id[row.id] = row
        for row_id in old:
            self._by_id.pop(row_id, None)
        self._bump_stamp()
        self._delete_rows(old)

    def _insert_chunks(self, rows: list[_Row], updates: list[DocumentUpdate]) -> None:
        batch: list[dict] = []
        for row, update in zip(rows, updates):
            for chunk, vector in zip(update.chunks, update.vectors if update.chunks else ()):
                batch.append(
                    {
                        "id": row.id * ORDINALS_PER_DOCUMENT + chunk.ordinal, "document_id": row.id, "ordinal": chunk.ordinal,
                        "text": chunk.text, "text_sha": chunk.text_sha, "pages": json.dumps(list(chunk.pages)),
                        "start": chunk.start, "end": chunk.end, "vector": np.asarray(vector, dtype=np.float32).tolist(),
                    }  # fmt: skip
                )
                if len(batch) >= _BATCH:
                    self.connection.call("insert", self.chunks_collection, batch)
                    batch = []
        if batch:
            self.connection.call("insert", self.chunks_collection, batch)

    def delete_documents(self, paths: list[str]) -> int:
        self._require_writable()
        self._ensure_registry_read()
        doomed = [self._live[p] for p in dict.fromkeys(paths) if p in self._live]
        if not doomed:
            return 0
        marked = [row.with_state("deleting") for row in doomed]
        self._upsert_rows(marked)
        for row in doomed:
            del self._live[row.path]
            self._by_id.pop(row.id, None)
        self._bump_stamp()
        self._delete_rows([row.id for row in doomed])
        return len(doomed)

    # ---- reading ---------------------------------------------------------
    def _visible(self) -> str:
        """A filter hiding the chunks of rows readers ignore (empty in the steady state)."""
        return f"document_id not in {_id_list(sorted(self._stale))}" if self._stale else ""

    def _chunk(self, row: dict) -> ChunkRecord | None:
        document = self._by_id.get(int(row["document_id"]))
        if document is None:
            return None  # a version written or deleted after our last refresh
        return ChunkRecord(
            int(row["id"]), document.id, document.path, int(row["ordinal"]), row["text"],
            tuple(json.loads(row["pages"])), int(row["start"]), int(row["end"]), row["text_sha"],
        )  # fmt: skip

    def _search(self, data, field: str, metric: str, k: int, params: dict) -> list[tuple[int, float]]:
        """(chunk id, distance) of the visible chunks nearest ``data``; rows are fetched by id afterwards,
        which is faster than carrying them through the search."""
        result = self.connection.call(
            "search", self.chunks_collection, data=data, anns_field=field, limit=k, filter=self._visible(),
            output_fields=["document_id"], search_params={"metric_type": metric, "params": params},
        )  # fmt: skip
        hits = result[0] if result else []
        return [(int(hit["id"]), float(hit["distance"])) for hit in hits if int(hit["entity"]["document_id"]) in self._by_id]

    def search(self, query_vector: np.ndarray, top_k: int) -> list[Hit]:
        self._ensure_registry_read()
        if not self._live:
            return []
        vector = np.asarray(query_vector, dtype=np.float32).reshape(-1).tolist()
        hits = self._search([vector], "vector", "IP", top_k, {"ef": max(HNSW_EF, top_k)})
        records = self.chunks(i for i, _ in hits)
        return [Hit(records[i], score) for i, score in hits if i in records]

    def lexical_search(self, query: str, k: int) -> list[tuple[int, float]]:
        self._ensure_registry_read()
        if not self._live or not query.strip() or k <= 0:
            return []
        # milvus-lite reports BM25 as a negated distance, a Milvus server as the score: both rank best first
        return [(i, abs(score)) for i, score in self._search([query], "sparse", "BM25", k, {})]

    def chunks(self, ids: Iterable[int]) -> dict[int, ChunkRecord]:
        self._ensure_registry_read()
        ids = sorted({int(i) for i in ids})
        found: dict[int, ChunkRecord] = {}
        for start in range(0, len(ids), _BATCH):
            rows = self.connection.call("get", self.chunks_collection, ids=ids[start : start + _BATCH], output_fields=_CHUNK_FIELDS)
            for row in rows:
                chunk = self._chunk(row)
                if chunk is not None:
                    found[chunk.id] = chunk
        return found

    def chunks_of_document(self, document_id: int, first: int, last: int) -> list[ChunkRecord]:
        self._ensure_registry_read()
        document = self._by_id.get(int(document_id))
        if document is None:
            return []
        ordinals = range(max(0, int(first)), min(int(last), document.chunk_count - 1) + 1)
        # chunk ids follow from document and ordinal: a primary-key lookup, not a filtered scan
        return sorted(self.chunks(document.id * ORDINALS_PER_DOCUMENT + o for o in ordinals).values(), key=lambda c: c.ordinal)

    def chunk_vectors(self, ids: list[int]) -> np.ndarray:
        """Read in batches: pymilvus returns a vector as a list of Python floats (about 12 KB at dim 384), so a
        million vectors read at once need over 12 GB."""
        out = np.empty((len(ids), self.manifest.dimension), dtype=np.float32)
        for start in range(0, len(ids), _BATCH):
            batch = [int(i) for i in ids[start : start + _BATCH]]
            rows = self.connection.call("get", self.chunks_collection, ids=batch, output_fields=["vector"])
            by_id = {int(row["id"]): row["vector"] for row in rows}
            out[start : start + len(batch)] = np.asarray([by_id[i] for i in batch], dtype=np.float32)
        return out

    def vectors_by_text(self, text_shas: Iterable[str]) -> dict[str, np.ndarray]:
        self._ensure_registry_read()
        wanted = sorted(set(text_shas))
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(wanted), _BATCH):
            filter = f"text_sha in {_string_list(wanted[start : start + _BATCH])}"
            if self._stale:
                filter += f" and {self._visible()}"
            for row in self.connection.query_all(self.chunks_collection, filter, ["text_sha", "vector"]):
                found.setdefault(row["text_sha"], np.asarray(row["vector"], dtype=np.float32))
        return found

    def check_consistency(self) -> list[str]:
        self.refresh()
        problems = []
        rows = self.connection.query_all(self.chunks_collection, "id >= 0", ["id", "document_id", "ordinal"])
        counts: dict[int, int] = {}
        for row in rows:
            document_id = int(row["document_id"])
            if int(row["id"]) != document_id * ORDINALS_PER_DOCUMENT + int(row["ordinal"]):
                problems.append(f"chunk {row['id']} has the wrong id for its document and ordinal")
            counts[document_id] = counts.get(document_id, 0) + 1
        known = set(self._by_id) | self._stale
        orphans = sum(n for document_id, n in counts.items() if document_id not in known)
        if orphans:
            problems.append(f"{orphans} chunks belong to no registered document")
        for row in self._live.values():
            if counts.get(row.id, 0) != row.chunk_count:
                problems.append(f"{row.path}: {counts.get(row.id, 0)} chunks stored, {row.chunk_count} registered")
        return problems
