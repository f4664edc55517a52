"""Ingestion jobs: an upload returns at once with a job; one worker thread runs the jobs in
order through the same service as ``ingest add``, and anyone may watch or cancel them.

A job's files wait in ``<home>/jobs/<id>/`` until the job moves them into the knowledge
base's upload folder (under its writer lock, as a synchronous upload does). Job records
live in ``<home>/jobs.sqlite`` so that, after a crash, a job that was queued or running is
reported as failed ("interrupted"), never as running forever, and ``retry`` re-runs the
files it had not committed (start-up moves them back beside the record).

Cancelling stops a running job at its next progress callback: batches already committed
stay, the batch in flight is not written, and uploaded files it never committed are removed.
Chat and search keep answering while a job runs, at about 1.5x their idle latency on two
cores (docs/BENCHMARKS.md, "Chat and search during an ingest"); making the job pause for
them between batches was measured to buy nothing and cost the ingest 30%, so it does not.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memory.ingestion import FileOutcome, Progress
from memory.knowledge_base import KnowledgeBaseError
from memory.service import KnowledgeBaseService

log = logging.getLogger("zhiku.api")

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("done", "failed", "cancelled")
INTERRUPTED = "interrupted: the server stopped before this job finished; retry it to ingest its remaining files"


class JobCancelled(Exception):
    """Raised inside a running job's progress callbacks once it is cancelled."""


@dataclass
class Job:
    """One upload's ingestion; ``files`` are ``[staged name, destination path]`` pairs."""

    id: str
    kb: str
    files: list[list[str]]
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    files_total: int = 0
    chunks_total: int = 0
    chunks_embedded: int = 0
    ocr_pages_read: int = 0
    outcomes: list[dict] = field(default_factory=list)
    finished_paths: list[str] = field(default_factory=list)  # files done so far, before their outcomes are known
    error: str | None = None
    retry_of: str | None = None
    version: int = 0  # bumped on every change, so watchers send only news

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def files_done(self) -> int:
        return len(self.finished_paths)


class JobStore:
    """Job records in SQLite (one row per job, the record as JSON); safe across threads."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, kb TEXT NOT NULL, created REAL NOT NULL, record TEXT NOT NULL)")
        self._lock = threading.Lock()

    def save(self, job: Job) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO jobs(id, kb, created, record) VALUES (?, ?, ?, ?)",
                (job.id, job.kb, job.created, json.dumps(asdict(job), ensure_ascii=False)),
            )

    def load_all(self) -> list[Job]:
        with self._lock:
            rows = self._conn.execute("SELECT record FROM jobs ORDER BY created").fetchall()
        return [Job(**json.loads(record)) for (record,) in rows]

    def delete_kb(self, kb: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM jobs WHERE kb = ?", (kb,))

    def close(self) -> None:
        self._conn.close()


class _JobProgress(Progress):
    """Counts a running job's progress into its record; raises once it is cancelled."""

    def __init__(self, jobs: "Jobs", job: Job):
        self.jobs, self.job = jobs, job

    def files_found(self, count: int) -> None:
        self.jobs._update(self.job, files_total=count)

    def file_done(self, path: str) -> None:
        self._check()
        self.jobs._update(self.job, finished_paths=[*self.job.finished_paths, path], persist=True)

    def chunks_queued(self, count: int) -> None:
        self._check()
        self.jobs._update(self.job, chunks_total=self.job.chunks_total + count)

    def chunks_embedded(self, count: int) -> None:
        self._check()
        self.jobs._update(self.job, chunks_embedded=self.job.chunks_embedded + count)

    def ocr_page(self, path: str, done: int, total: int) -> None:
        self.jobs._update(self.job, ocr_pages_read=self.job.ocr_pages_read + 1)  # no cancel check: another thread

    def _check(self) -> None:
        if self.job.id in self.jobs._cancelling:
            raise JobCancelled(self.job.id)


class Jobs:
    """The server's ingestion jobs: submit, look up, cancel, retry; one worker runs them in order."""

    def __init__(self, home: Path, service: KnowledgeBaseService, embedder):
        self.home = home
        self.service = service
        self.embedder = embedder
        self.store = JobStore(home / "jobs.sqlite")
        self._jobs: dict[str, Job] = {}
        self._cancelling: set[str] = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    # ---- start-up and shutdown

    def recover(self) -> None:
        """Load the records; a job a crash cut off becomes failed (interrupted), its uncommitted files kept for retry.

        Call before ``api.uploads.clean_leftovers``, which removes uploaded files no knowledge base lists.
        """
        for job in self.store.load_all():
            if job.state in ACTIVE_STATES:
                self._take_back_uncommitted(job)
                job.state, job.error, job.finished = "failed", INTERRUPTED, time.time()
                self.store.save(job)
            self._jobs[job.id] = job

    def _start_worker(self) -> None:
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._run_all, name="zhiku-jobs", daemon=True)
                self._worker.start()

    def close(self) -> None:
        """Cancel what runs, stop the worker (queued jobs stay queued and read as interrupted next start)."""
        with self._lock:
            self._cancelling.update(j.id for j in self._jobs.values() if j.state == "running")
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout=60)
        self.store.close()

    # ---- the API

    def job_dir(self, job_id: str) -> Path:
        return self.home / "jobs" / job_id

    def new_id(self) -> str:
        return f"job-{uuid.uuid4().hex[:16]}"

    def submit(self, job_id: str, kb: str, files: list[tuple[Path, Path]], retry_of: str | None = None) -> Job:
        """Queue a job for files already staged in ``job_dir(job_id)``: ``(staged file, destination)`` pairs."""
        job = Job(job_id, kb, [[p.name, str(d)] for p, d in files], files_total=len(files), retry_of=retry_of)
        with self._lock:
            self._jobs[job.id] = job
        self.store.save(job)
        self._queue.put(job.id)
        self._start_worker()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list(self, kb: str) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.kb == kb]

    def cancel(self, job: Job) -> Job:
        """Cancel a queued job now, a running one at its next progress step; a finished one is left as it is."""
        with self._lock:
            if job.state == "queued":
                self._finish(job, "cancelled")
                shutil.rmtree(self.job_dir(job.id), ignore_errors=True)
            elif job.state == "running":
                self._cancelling.add(job.id)
        return job

    def retry(self, job: Job) -> Job | None:
        """A new job for the files a failed or cancelled job left uncommitted (None when there are none)."""
        old_dir = self.job_dir(job.id)
        files = [(old_dir / staged, Path(dest)) for staged, dest in job.files if (old_dir / staged).is_file()]
        if not files:
            return None
        new_id = self.new_id()
        new_dir = self.job_dir(new_id)
        new_dir.mkdir(parents=True)
        moved = []
        for staged, destination in files:
            os.replace(staged, new_dir / staged.name)
            moved.append((new_dir / staged.name, destination))
        shutil.rmtree(old_dir, ignore_errors=True)
        return self.submit(new_id, job.kb, moved, retry_of=job.id)

    def forget_kb(self, kb: str) -> None:
        """A dropped knowledge base's finished jobs go with it."""
        with self._lock:
            for job in [j for j in self._jobs.values() if j.kb == kb and j.final]:
                del self._jobs[job.id]
                shutil.rmtree(self.job_dir(job.id), ignore_errors=True)
        self.store.delete_kb(kb)

    # ---- the worker

    def _run_all(self) -> None:
        while (job_id := self._queue.get()) is not None:
            job = self.get(job_id)
            if job is not None and job.state == "queued":
                self._run(job)

    def _run(self, job: Job) -> None:
        self._update(job, state="running", started=time.time(), persist=True)
        folder = self.job_dir(job.id)
        staged = [(folder / name, Path(dest)) for name, dest in job.files]
        try:
            report = self.service.add(job.kb, [], self.embedder, staged=staged, progress=_JobProgress(self, job))
        except JobCancelled:
            self._drop_uncommitted(job)
            self._finish(job, "cancelled")
        except KnowledgeBaseError as exc:
            self._finish(job, "failed", error=str(exc))
        except Exception as exc:  # a bug must not kill the worker: the job says what happened
            log.exception("ingestion job %s failed", job.id)
            self._finish(job, "failed", error=f"internal error: {type(exc).__name__}: {exc}")
        else:
            failed = len(report.failed)
            error = f"{failed} of {len(report.outcomes)} files failed" if failed else None
            self._finish(job, "done", error=error, outcomes=[asdict(o) for o in report.outcomes])
        finally:
            self._cancelling.discard(job.id)
        if job.state == "done":
            shutil.rmtree(folder, ignore_errors=True)

    def _update(self, job: Job, persist: bool = False, **changes) -> None:
        for key, value in changes.items():
            setattr(job, key, value)
        job.version += 1
        if persist:
            self.store.save(job)

    def _finish(self, job: Job, state: str, error: str | None = None, outcomes: list[dict] | None = None) -> None:
        self._update(job, state=state, error=error, finished=time.time(), persist=True, **({"outcomes": outcomes} if outcomes is not None else {}))

    def _committed_paths(self, kb: str) -> set[str]:
        try:
            return {d.path for d in self.service.documents(kb)}
        except KnowledgeBaseError:
            return set()

    @staticmethod
    def _uncommitted(job: Job, committed: set[str]) -> list[tuple[str, Path]]:
        """``(staged name, destination)`` of the job's files moved into the upload folder but not in ``committed``."""
        pairs = [(staged, Path(destination)) for staged, destination in job.files]
        return [(staged, path) for staged, path in pairs if path.is_file() and str(path.resolve()) not in committed]

    def _drop_uncommitted(self, job: Job) -> None:
        """After a cancel: uploaded files the knowledge base never committed are removed."""
        committed = self._committed_paths(job.kb)
        for _, path in self._uncommitted(job, committed):
            path.unlink(missing_ok=True)
        resolved = [str(Path(d).resolve()) for _, d in job.files]
        job.outcomes = [asdict(FileOutcome(d, "ingested" if d in committed else "cancelled")) for d in resolved]
        shutil.rmtree(self.job_dir(job.id), ignore_errors=True)

    def _take_back_uncommitted(self, job: Job) -> None:
        """Interrupted: files moved into the upload folder but never committed go back to the job's folder."""
        folder = self.job_dir(job.id)
        for staged, path in self._uncommitted(job, self._committed_paths(job.kb)):
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(path, folder / staged)
