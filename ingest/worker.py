"""A child process that parses files for its parent (``memory.ingestion`` runs one).

Parsing is pure Python (pdfplumber, jieba): in the process that embeds it would
hold the GIL the embedding thread needs, so a first ingest parses here while
the parent loads the model and embeds. Requests and answers are pickles sent
over the child's stdin/stdout, answered in order::

    >>> worker = ParseWorker()                                           # doctest: +SKIP
    >>> ticket = worker.submit(prepare_files, ["a.md"], 600, 120, token_text)  # doctest: +SKIP
    >>> worker.result(ticket)                                            # doctest: +SKIP
    [PreparedFile(status='ok', reason=None, chunks=[...])]

While it parses, the child also sends notes: each page OCR reads (``ingest.ocr``) reaches
the parent's ``on_ocr_page(path, done, total)``, called on the thread that reads answers.

It is a plain subprocess, not multiprocessing: nothing of the parent is
inherited (not the knowledge base's lock file, not its SQLite handle) and the
parent's ``__main__`` is never re-imported. When the parent dies, the child
reads end-of-file and exits. Answers are read off the pipe as soon as they
come, so the child never waits for the parent to want them.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

_HEADER = struct.Struct("<Q")
# Every frame from the child starts with its kind: an answer to a request, or a note.
_ANSWER, _NOTE = b"A", b"N"
_ROOT = Path(__file__).resolve().parents[1]


class WorkerDied(RuntimeError):
    """The parsing process exited before answering."""


class ParseWorker:
    """The parent's handle on one parsing process."""

    def __init__(
        self, *, niceness: int = 0, pdfminer_level: int | None = None, on_ocr_page: Callable[[str, int, int], None] | None = None
    ):
        self.on_ocr_page = on_ocr_page
        level = logging.getLogger("pdfminer").level if pdfminer_level is None else pdfminer_level
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ingest.worker", str(level), str(niceness)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._sent = 0
        self._received = 0  # answers read off the pipe (not necessarily collected yet)
        self._answers: dict[int, bytes] = {}
        self._arrived = threading.Condition()
        self._dead: WorkerDied | None = None
        # Requests go through one thread and answers through another, so that the child
        # never waits on a full pipe: it parses ahead while the caller is busy elsewhere.
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_requests, name="zhiku-parse-requests", daemon=True)
        self._reader = threading.Thread(target=self._read_answers, name="zhiku-parse-answers", daemon=True)
        self._writer.start()
        self._reader.start()

    def submit(self, function: Callable, *args) -> int:
        """Queue ``function(*args)`` in the child; returns a ticket for :meth:`result`."""
        self._outbox.put(pickle.dumps((function, args), protocol=pickle.HIGHEST_PROTOCOL))
        self._sent += 1
        return self._sent - 1

    def result(self, ticket: int):
        """The return value of request ``ticket`` (raises what it raised); each ticket is collected once."""
        with self._arrived:
            while ticket not in self._answers:
                if self._dead is not None:
                    raise self._dead
                self._arrived.wait()
            payload = self._answers.pop(ticket)
        ok, value = pickle.loads(payload)
        if ok:
            return value
        raise value

    def _read_answers(self) -> None:
        stream = self.process.stdout
        while True:
            header = _read_exactly(stream, _HEADER.size)
            payload = _read_exactly(stream, _HEADER.unpack(header)[0]) if header else None
            if payload is not None and payload[:1] == _NOTE:
                if self.on_ocr_page is not None:
                    self.on_ocr_page(*pickle.loads(payload[1:]))
                continue
            with self._arrived:
                if payload is None:
                    code = self.process.wait()
                    self._dead = WorkerDied(f"the parsing process exited with code {code} before answering")
                    self._arrived.notify_all()
                    return
                self._answers[self._received] = payload[1:]
                self._received += 1
                self._arrived.notify_all()

    def close(self) -> None:
        """Stop the child: at once when requests are still unanswered (nobody wants them), else
        by end-of-file on its stdin."""
        if self._received < self._sent:
            self.process.kill()
        self._outbox.put(None)
        self._writer.join(timeout=5)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        self.process.stdout.close()

    def _write_requests(self) -> None:
        stdin = self.process.stdin
        try:
            while (payload := self._outbox.get()) is not None:
                stdin.write(_HEADER.pack(len(payload)) + payload)
                stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone: result() reports it
        finally:
            try:
                stdin.close()
            except OSError:
                pass


def _read_exactly(stream, size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


def _serve(level: int, niceness: int) -> None:
    logging.getLogger("pdfminer").setLevel(level)
    if niceness:
        try:
            os.nice(niceness)  # yield the cores to the parent's embedding threads when both want them
        except OSError:  # pragma: no cover - not permitted: run at normal priority
            pass
    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not corrupt the answers

    def send(kind: bytes, payload: bytes) -> None:
        answers.write(_HEADER.pack(len(payload) + 1) + kind + payload)
        answers.flush()

    from ingest.ocr import ocr_pages_reported

    with ocr_pages_reported(lambda *page: send(_NOTE, pickle.dumps(page))):
        _answer_requests(requests, send)


def _answer_requests(requests, send: Callable[[bytes, bytes], None]) -> None:
    while True:
        header = _read_exactly(requests, _HEADER.size)
        if header is None:
            return
        payload = _read_exactly(requests, _HEADER.unpack(header)[0])
        if payload is None:
            return
        try:
            function, args = pickle.loads(payload)
            answer = pickle.dumps((True, function(*args)), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
            answer = pickle.dumps((False, _picklable(exc)), protocol=pickle.HIGHEST_PROTOCOL)
        send(_ANSWER, answer)


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__} in the parsing process: {exc}")


if __name__ == "__main__":
    try:
        _serve(int(sys.argv[1]), int(sys.argv[2]))
    except (BrokenPipeError, KeyboardInterrupt):  # the parent is gone or stopping: nothing to answer
        pass
