"""Filling knowledge bases: files → chunks (ingest/) → vectors → store, incrementally.

``add_paths`` is what ``ingest add`` runs. A file is re-read only when its
content hash changed; a chunk text already embedded anywhere in the knowledge
base (or earlier in the run) reuses its vector instead of being embedded again.
Documents are committed in batches, each one transaction, so a kill loses at
most the batches in flight and the next run finishes the work.

Three things run at once on a first ingest (measured in docs/BENCHMARKS.md,
"Ingest: zhiku vs LangChain reference"):

* a worker thread loads the embedding model as soon as a file needs parsing,
  then embeds batch after batch (torch runs outside the GIL);
* a parsing process loads, cleans and splits files and computes each chunk's
  BM25 tokens (pdfplumber and jieba are pure Python: in this process they
  would hold the GIL the embedding thread needs), a bounded number of files
  ahead of the embedder;
* the calling thread hashes files, skips unchanged ones and commits batches.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ingest.documents import ReadOptions
from ingest.loaders import SLOW_SUFFIXES
from ingest.ocr import ocr_pages_reported
from ingest.pipeline import IndexableChunk, PreparedFile, iter_candidate_files, prepare_files
from ingest.worker import ParseWorker
from memory.files import file_sha256, fsync_dir
from memory.lexical_index import token_text
from memory.knowledge_base import (
    DocumentUpdate,
    EmbedderMismatch,
    KnowledgeBase,
    KnowledgeBaseError,
    KnowledgeBases,
    Manifest,
)

EMBED_BATCH_CHUNKS = 1024  # default of Settings.ingest_batch_chunks
# Parsing in a separate process pays off from this many files to parse (or one PDF or image);
# below it, starting the process costs more than it saves.
PARALLEL_PARSE_MIN_FILES = 8
PARSE_GROUP_FILES = 16  # files per task sent to the parsing process...
PARSE_GROUP_BYTES = 128 * 1024  # ...or fewer when they are this big together
# Parsing runs ahead of embedding by up to this many files or bytes of files: on a first
# ingest it gets through most files while the model loads, and is idle during embedding.
READ_AHEAD_FILES = 4096
READ_AHEAD_BYTES = 8 * 1024 * 1024
PARSE_WORKER_NICENESS = 5


class Progress:
    """Callbacks for long work; the default does nothing (the CLI draws bars)."""

    def files_found(self, count: int) -> None: ...
    def file_done(self, path: str) -> None: ...
    def chunks_queued(self, count: int) -> None: ...
    def chunks_embedded(self, count: int) -> None: ...
    def ocr_page(self, path: str, done: int, total: int) -> None:
        """Page ``done`` of the ``total`` that ``path`` needs OCR for was read (called from another thread)."""


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one file: ingested, unchanged, failed, skipped or removed."""

    path: str
    outcome: str
    chunks: int = 0
    error: str | None = None


@dataclass
class IngestReport:
    outcomes: list[FileOutcome] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes if o.outcome == outcome)

    @property
    def failed(self) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.outcome == "failed"]

    @property
    def exit_code(self) -> int:
        """0 when every file succeeded, 1 when some failed (the rest were ingested)."""
        return 1 if self.failed else 0


def manifest_for(name: str, embedder, chunk_size: int, chunk_overlap: int, backend: str = "local") -> Manifest:
    return Manifest(
        backend=backend,
        name=name,
        embedding_model=embedder.model_id,
        dimension=embedder.dimension,
        chunk_size=chunk_size,
        chunk_overlap=chunk_overlap,
        store="store-1",
        created=datetime.now(timezone.utc).isoformat(),
    )


def check_compatible(manifest: Manifest, embedding_model: str | None, chunk_size: int | None, chunk_overlap: int | None) -> None:
    """Refuse to mix embedders or chunking inside one knowledge base."""
    if embedding_model is not None and embedding_model != manifest.embedding_model:
        raise EmbedderMismatch(
            f"knowledge base {manifest.name!r} was built with embedding model {manifest.embedding_model!r}, "
            f"not {embedding_model!r}; re-embed it with `ingest rebuild --kb {manifest.name} "
            f"--embedding-model {embedding_model}` or use another --kb"
        )
    for label, wanted, pinned in (
        ("chunk_size", chunk_size, manifest.chunk_size),
        ("chunk_overlap", chunk_overlap, manifest.chunk_overlap),
    ):
        if wanted is not None and wanted != pinned:
            raise KnowledgeBaseError(
                f"knowledge base {manifest.name!r} was split with {label}={pinned}, not {wanted}; "
                "drop it (`ingest drop`) and add the files again, or use another --kb"
            )


class _CumulativeToDelta:
    """Turns an embedder's "n done so far" callbacks into progress advances."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.done = 0

    def __call__(self, done: int) -> None:
        self.progress.chunks_embedded(done - self.done)
        self.done = done


@dataclass
class _InFlight:
    """A batch whose new texts are being embedded in the background."""

    documents: list[tuple[DocumentUpdate, list]]
    known: dict[str, np.ndarray]
    missing: list[str]
    vectors: Future


class _Batcher:
    """Collects documents, embeds each batch in a worker thread while the next one is parsed,
    and commits batches in order from the calling thread (one transaction each).

    A text is embedded once: texts already stored are reused, and texts of the batch
    still in flight are taken from its results when the next batch commits.
    """

    def __init__(self, kb: KnowledgeBase, embedder, progress: Progress, batch_chunks: int = EMBED_BATCH_CHUNKS):
        self.kb = kb
        self.batch_chunks = batch_chunks
        self.embedder = embedder
        self.progress = progress
        self.pending: list[tuple[DocumentUpdate, list]] = []
        self.pending_chunks = 0
        self.in_flight: _InFlight | None = None
        self.previous_fresh: dict[str, np.ndarray] = {}
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zhiku-embed")

    def warm_up(self) -> None:
        """Start loading the embedding model in the worker, ahead of the first batch."""
        warm_up = getattr(self.embedder, "warm_up", None)
        if warm_up is not None:
            self.worker.submit(warm_up)

    def add(self, update: DocumentUpdate, chunks: list[IndexableChunk]) -> None:
        self.pending.append((update, chunks))
        self.pending_chunks += len(chunks)
        self.progress.chunks_queued(len(chunks))
        if self.pending_chunks >= self.batch_chunks:
            self._submit()

    def finish(self) -> None:
        """Embed and commit everything still pending."""
        if self.pending:
            self._submit()
        self._commit_in_flight()

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)

    def _submit(self) -> None:
        documents, self.pending, self.pending_chunks = self.pending, [], 0
        texts = {c.text_sha: c.text for _, chunks in documents for c in chunks}
        known = self.kb.vectors_by_text(texts)
        embedding_now = set(self.in_flight.missing) if self.in_flight else set()
        missing = [sha for sha in texts if sha not in known and sha not in embedding_now]
        self.progress.chunks_embedded(sum(len(chunks) for _, chunks in documents) - len(missing))
        vectors = self.worker.submit(
            self.embedder.embed_passages, [texts[sha] for sha in missing], _CumulativeToDelta(self.progress)
        )
        self._commit_in_flight()
        self.in_flight = _InFlight(documents, known, missing, vectors)

    def _commit_in_flight(self) -> None:
        if self.in_flight is None:
            return
        batch, self.in_flight = self.in_flight, None
        fresh = dict(zip(batch.missing, batch.vectors.result()))
        lookup = {**self.previous_fresh, **batch.known, **fresh}
        updates = [
            replace(update, chunks=tuple(chunks), vectors=np.vstack([lookup[c.text_sha] for c in chunks]))
            if chunks
            else update
            for update, chunks in batch.documents
        ]
        self.kb.put_documents(updates)
        self.previous_fresh = fresh


def embed_reusing(kb: KnowledgeBase, embedder, chunks: list[IndexableChunk], progress: Progress) -> np.ndarray:
    """Vectors for ``chunks``, embedding only texts the knowledge base has never seen."""
    known = kb.vectors_by_text(c.text_sha for c in chunks)
    missing = {c.text_sha: c.text for c in chunks if c.text_sha not in known}
    progress.chunks_embedded(len(chunks) - len(missing))
    if missing:
        fresh = embedder.embed_passages(list(missing.values()), progress=_CumulativeToDelta(progress))
        known.update(zip(missing, fresh))
    return np.vstack([known[c.text_sha] for c in chunks]) if chunks else np.zeros((0, embedder.dimension), np.float32)


def add_paths(
    kbs: KnowledgeBases,
    name: str,
    paths: Iterable[Path],
    embedder,
    *,
    chunk_size: int,
    chunk_overlap: int,
    prune: bool = False,
    progress: Progress | None = None,
    staged: Sequence[tuple[Path, Path]] = (),
    batch_chunks: int = EMBED_BATCH_CHUNKS,
    backend: str | None = None,
    read_options: ReadOptions = ReadOptions(),
) -> IngestReport:
    """Ingest files and folders into knowledge base ``name`` (created when missing);
    ``read_options``: OCR of images and scanned PDF pages, PDF tables.

    ``staged`` are ``(staged file, destination)`` pairs (uploads): they are moved to
    their destination only once the writer lock is held, then ingested with ``paths``,
    so a refused or interrupted upload never replaces a file another writer is reading.
    """
    progress = progress or Progress()
    paths = [Path(p) for p in paths]
    report = IngestReport()
    new = manifest_for(name, embedder, chunk_size, chunk_overlap, backend or kbs.default_backend)
    with kbs.writer(name, create=new) as kb:
        if backend is not None and backend != kb.manifest.backend:
            raise KnowledgeBaseError(
                f"knowledge base {name!r} is stored on the {kb.manifest.backend!r} backend, not {backend!r}; "
                "a knowledge base keeps its backend (drop it and add the files again to move it)"
            )
        check_compatible(kb.manifest, embedder.model_id, chunk_size, chunk_overlap)
        paths += move_into_place(staged)
        files = list(iter_candidate_files(paths))
        progress.files_found(len(files))
        batcher = _Batcher(kb, embedder, progress, batch_chunks)
        parallel = len(files) >= PARALLEL_PARSE_MIN_FILES or any(p.suffix.lower() in SLOW_SUFFIXES for p in files)
        parser = _Parser(chunk_size, chunk_overlap, parallel, read_options, progress)
        queue: deque[FileOutcome | _Parsing] = deque()
        ahead = 0  # bytes of the files in ``queue``

        def finish_oldest() -> None:
            nonlocal ahead
            item = queue.popleft()
            if isinstance(item, FileOutcome):
                outcome = item
            else:
                ahead -= item.size
                outcome = item.finish(parser, batcher)
            report.outcomes.append(outcome)
            progress.file_done(outcome.path)

        try:
            for path in files:
                item = _check_file(kb, path)
                if isinstance(item, _Parsing):
                    if not parser.started:
                        parser.start()
                        batcher.warm_up()
                    parser.submit(item)
                    ahead += item.size
                queue.append(item)
                while len(queue) > READ_AHEAD_FILES or ahead > READ_AHEAD_BYTES:
                    finish_oldest()
            while queue:
                finish_oldest()
            batcher.finish()
        finally:
            parser.close()
            batcher.close()
        if prune:
            report.outcomes += prune_missing(kb, paths)
    return report


@dataclass
class _Parsing:
    """A file that needs (re)parsing: which task parses it, and where its result is in that task's."""

    key: str
    source: str  # the path as found (its suffix decides how it is read, even through a symlink)
    sha256: str
    size: int
    task: "_ParseTask | None" = None
    slot: int = 0

    def finish(self, parser: "_Parser", batcher: _Batcher) -> FileOutcome:
        prepared: PreparedFile = parser.result(self)
        update = DocumentUpdate(self.key, self.sha256, self.size, prepared.status, prepared.reason, ocr_pages=prepared.ocr_pages)
        batcher.add(update, prepared.chunks)
        if prepared.status == "ok":
            return FileOutcome(self.key, "ingested", len(prepared.chunks))
        return FileOutcome(self.key, prepared.status, error=prepared.reason)


@dataclass
class _ParseTask:
    paths: list[str] = field(default_factory=list)
    size: int = 0
    submitted: bool = False
    ticket: int = -1  # in the parsing process
    results: list[PreparedFile] | None = None


class _Parser:
    """Parses files (load, clean, split, tokenise) in groups, in a separate process when ``parallel``."""

    def __init__(
        self, chunk_size: int, chunk_overlap: int, parallel: bool, read_options: ReadOptions = ReadOptions(), progress: Progress | None = None
    ):
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.parallel = parallel
        self.read_options = read_options
        self.progress = progress or Progress()
        self.started = False
        self.worker: ParseWorker | None = None
        self.group = _ParseTask()

    def start(self) -> None:
        self.started = True
        if self.parallel:
            self.worker = ParseWorker(niceness=PARSE_WORKER_NICENESS, on_ocr_page=self.progress.ocr_page)

    def submit(self, item: _Parsing) -> None:
        item.task, item.slot = self.group, len(self.group.paths)
        self.group.paths.append(item.source)
        self.group.size += item.size
        if len(self.group.paths) >= PARSE_GROUP_FILES or self.group.size >= PARSE_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        task, self.group = self.group, _ParseTask()
        if not task.paths:
            return
        task.submitted = True
        args = (task.paths, self.chunk_size, self.chunk_overlap, token_text, self.read_options)
        if self.worker is not None:
            task.ticket = self.worker.submit(prepare_files, *args)
        else:
            with ocr_pages_reported(self.progress.ocr_page):
                task.results = prepare_files(*args)

    def result(self, item: _Parsing) -> PreparedFile:
        task = item.task
        if not task.submitted:
            self.flush()
        if task.results is None:
            task.results = self.worker.result(task.ticket)
        prepared, task.results[item.slot] = task.results[item.slot], None  # freed once committed
        return prepared

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _check_file(kb: KnowledgeBase, path: Path) -> FileOutcome | _Parsing:
    """The outcome of a file that needs no parsing (unreadable, unchanged), else what to parse."""
    key = str(path.resolve())
    try:
        size = path.stat().st_size
        sha = file_sha256(path)
    except OSError as exc:
        return FileOutcome(key, "failed", error=f"cannot read: {exc.strerror or exc}")
    stored = kb.document(key)
    if stored is not None and stored.sha256 == sha and stored.status in ("ok", "skipped"):
        return FileOutcome(key, "unchanged" if stored.status == "ok" else "skipped", stored.chunk_count, stored.error)
    return _Parsing(key, str(path), sha, size)


def move_into_place(staged: Sequence[tuple[Path, Path]]) -> list[Path]:
    """Move each staged file to its destination (atomically, durably); the destinations."""
    for source, destination in staged:
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)
    for folder in {destination.parent for _, destination in staged}:
        fsync_dir(folder)
    return [destination for _, destination in staged]


def _is_under(path: str, roots: list[Path]) -> bool:
    candidate = Path(path)
    return any(candidate == root or root in candidate.parents for root in roots)


def prune_missing(kb: KnowledgeBase, roots: list[Path]) -> list[FileOutcome]:
    """Remove documents under ``roots`` whose files no longer exist."""
    roots = [r.resolve() for r in roots]
    gone = [d.path for d in kb.documents() if _is_under(d.path, roots) and not Path(d.path).exists()]
    kb.delete_documents(gone)
    return [FileOutcome(p, "removed") for p in gone]


def remove_paths(kbs: KnowledgeBases, name: str, paths: Iterable[Path]) -> list[FileOutcome]:
    """Remove documents (a file, or every document under a folder) from ``name``."""
    roots = [Path(p).resolve() for p in paths]
    with kbs.writer(name) as kb:
        doomed = [d.path for d in kb.documents() if _is_under(d.path, roots)]
        kb.delete_documents(doomed)
    return [FileOutcome(p, "removed") for p in doomed]


def rebuild(kbs: KnowledgeBases, name: str, embedder, progress: Progress | None = None) -> Manifest:
    """Re-embed every stored chunk of ``name`` with ``embedder`` into a new store, then switch to it.

    The old store stays active until the new one is complete, so a kill during a
    rebuild leaves the knowledge base as it was.
    """
    progress = progress or Progress()
    with kbs.lock(name):
        old = kbs.manifest(name)
        new = replace(
            old,
            embedding_model=embedder.model_id,
            dimension=embedder.dimension,
            store=f"store-{int(old.store.removeprefix('store-')) + 1}",
        )
        source = kbs.instance(old, writable=False)
        target = kbs.instance(new, writable=True)
        try:
            _copy_reembedded(source, target, embedder, progress)
        finally:
            source.close()
            target.close()  # builds and saves its indexes before the switch: readers never start from nothing
        kbs.replace_store(name, new)
    return new


def _copy_reembedded(source: KnowledgeBase, target: KnowledgeBase, embedder, progress: Progress) -> None:
    documents = source.documents()
    progress.files_found(len(documents))
    progress.chunks_queued(sum(d.chunk_count for d in documents))
    for document in documents:
        stored = source.chunks_of_document(document.id, 0, document.chunk_count)
        new_chunks = tuple(IndexableChunk(c.ordinal, c.text, c.text_sha, c.pages, c.start, c.end) for c in stored)
        vectors = embed_reusing(target, embedder, list(new_chunks), progress)
        update = DocumentUpdate(
            document.path, document.sha256, document.size, document.status, document.error, new_chunks, vectors, document.ocr_pages
        )
        target.put_documents([update])
        progress.file_done(document.path)
