"""The waiting list and the worker thread: continuous (iteration-level) batching.

One worker thread owns the model. Between two decode steps it admits waiting
requests into free slots of the running batch (at most ``max_batch_size``
rows), prefilling them together up to ``prefill_tokens`` prompt tokens per
step (one request at a time on a CPU, where a prefill is compute-bound); a row
that finishes or is cancelled leaves the batch at once. So a request that
arrives while others decode starts after one step, not after the longest of them.

All rows of the running batch share one adapter; a request for another adapter
waits until the batch drains, and once such a request has waited
``starvation_s`` no more same-adapter newcomers are admitted. An idle worker
takes the oldest request's adapter, after a short window (``batch_wait_s``)
that lets requests sent together start together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rag.generation import GenerationError, GenerationEvent, GeneratorOverloaded, SamplingParams

if TYPE_CHECKING:
    from rag.local_generator.batch import RunningBatch
    from rag.local_generator.sequence import Row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratorStats:
    """A snapshot of the batcher, for tests, metrics and the readiness check."""

    ready: bool  # model loaded and worker alive
    queue_depth: int  # requests waiting for a batch slot
    running: int  # rows currently decoding
    batches_run: int  # batches started from idle (requests joining a running batch do not count)
    requests_served: int  # requests that went through a batch (finished, cancelled or failed)
    largest_batch: int


@dataclass(eq=False)
class Request:
    """One generation: what the worker needs to run it and the queue its events go back on."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the consumer's side; read by the worker each step
    arrived: float = field(default_factory=time.monotonic)  # for the adapter starvation bound

    def send(self, item: GenerationEvent | BaseException) -> None:
        """Hand an event to the consumer's event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            self.cancelled = True


class Batcher:
    """The bounded waiting list and the one worker thread that owns the model.

    The worker alternates between admitting waiting requests into the running
    batch (free slots, same adapter, no other prefill under way) and one step of
    that batch (a chunk of the newcomers' prefill, then one decode step).
    """

    def __init__(
        self,
        max_batch_size: int,
        queue_size: int,
        batch_wait_s: float,
        batch: RunningBatch,
        prefill_tokens: int,
        starvation_s: float = 2.0,
    ) -> None:
        self._max_batch = max_batch_size
        self._queue_size = queue_size
        self._batch_wait_s = batch_wait_s
        self._starvation_s = starvation_s
        self._prefill_tokens = prefill_tokens
        self._batch = batch
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.shutting_down = threading.Event()  # read by the worker: stop the running rows at the next step
        self._running = 0
        self._batches = 0
        self._served = 0
        self._largest = 0
        self._seconds_per_request = 1.0  # running estimate of a row's time in the batch, for Retry-After
        self._thread = threading.Thread(target=self._work, name="zhiku-generator", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._closing:
                raise GenerationError("the generator is shut down")
            if len(self._waiting) >= self._queue_size:
                batches_ahead = 1 + len(self._waiting) // self._max_batch
                raise GeneratorOverloaded(
                    f"{len(self._waiting)} requests are already waiting for the generator",
                    retry_after=max(1.0, round(batches_ahead * self._seconds_per_request, 1)),
                )
            self._waiting.append(request)
            self._cond.notify()

    def withdraw(self, request: Request) -> None:
        """Drop a request that is still waiting (its consumer went away)."""
        with self._cond:
            with contextlib.suppress(ValueError):
                self._waiting.remove(request)

    def stats(self) -> GeneratorStats:
        with self._cond:
            return GeneratorStats(
                ready=self._thread.is_alive() and not self._closing,
                queue_depth=len(self._waiting),
                running=self._running,
                batches_run=self._batches,
                requests_served=self._served,
                largest_batch=self._largest,
            )

    def close(self) -> None:
        self.shutting_down.set()
        with self._cond:
            self._closing = True
            leftovers = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for request in leftovers:
            request.send(GenerationError("the generator is shut down"))
        self._thread.join()

    # ---------------------------------------------------------------- worker thread

    def _work(self) -> None:
        while (newcomers := self._next_admission()) is not None:
            left: list[Row] = []
            try:
                if newcomers:
                    left += self._batch.admit(newcomers)
                if len(self._batch):
                    left += self._batch.step(self.shutting_down.is_set())
            except Exception as exc:  # the batch reports to its rows; the worker must survive anything
                log.exception("generator worker: unexpected error")
                left += self._batch.fail_all(GenerationError(f"generation failed: {type(exc).__name__}: {exc}"))
            self._account(left)
        self._batch.step(shutting_down=True)  # closing: whatever still runs ends with an error

    def _account(self, left: list[Row]) -> None:
        now = time.perf_counter()
        with self._cond:
            self._running = len(self._batch)
            self._served += len(left)
            for row in left:
                self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * (now - row.admitted_at)

    def _next_admission(self) -> list[Request] | None:
        """Requests to join the running batch now (maybe none); None when closing.

        An idle worker waits for work, then a short window after the first
        arrival lets requests sent together start together.
        """
        with self._cond:
            deadline = None
            while True:
                self._drop_cancelled()
                if self._closing:
                    return None
                if len(self._batch):
                    return self._take(self._max_batch - len(self._batch))
                if not self._waiting:
                    deadline = None
                    self._cond.wait()
                    continue
                deadline = deadline or time.monotonic() + self._batch_wait_s
                remaining = deadline - time.monotonic()
                if len(self._waiting) < self._max_batch and remaining > 0:
                    self._cond.wait(remaining)
                    continue
                taken = self._take(self._max_batch)
                self._batches += 1  # counted when started: a test sees the batch while it runs
                return taken

    def _take(self, free: int) -> list[Request]:
        """Up to ``free`` waiting requests for the running batch's adapter (the oldest's when idle)."""
        if free <= 0 or not self._waiting or not self._batch.accepting:
            return []
        if len(self._batch):
            adapter = self._batch.adapter
            if self._other_adapter_starving(adapter):
                return []  # let the batch drain so the next one serves the other adapter
        else:
            adapter = self._waiting[0].adapter
        taken = self._within_prefill_budget([r for r in self._waiting if r.adapter == adapter][:free])
        for request in taken:
            self._waiting.remove(request)
        self._running = len(self._batch) + len(taken)
        self._largest = max(self._largest, self._running)
        return taken

    def _within_prefill_budget(self, candidates: list[Request]) -> list[Request]:
        """The first candidates whose prompts fit the per-step prefill budget (always at least one).

        On a CPU a prefill is compute-bound: eight prompts prefilled together take
        eight times as long and delay every first token to the end. One at a time,
        with a decode step between, the first answer starts after one prefill.
        """
        taken, budget = [], self._prefill_tokens
        for request in candidates:
            if taken and len(request.prompt_ids) > budget:
                break
            taken.append(request)
            budget -= len(request.prompt_ids)
        return taken

    def _other_adapter_starving(self, adapter: str | None) -> bool:
        now = time.monotonic()
        return any(r.adapter != adapter and now - r.arrived > self._starvation_s for r in self._waiting)

    def _drop_cancelled(self) -> None:
        live = [r for r in self._waiting if not r.cancelled]
        if len(live) != len(self._waiting):
            self._waiting = deque(live)
