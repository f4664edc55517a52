"""The running batch: prefill newcomers, one decode step at a time for every row.

The decode loop is ours (not ``generate()``): one batched KV cache, a 2-D
attention mask and explicit positions per row, so rows of different lengths
and ages share each forward pass. With the same positions, masks and kernels,
a greedy row alone gives exactly what ``generate()`` gives.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import torch

from rag.generation import GenerationError
from rag.local_generator.forward import Forward
from rag.local_generator.kv_cache import GrowingCache
from rag.local_generator.sequence import Row

if TYPE_CHECKING:
    from rag.local_generator.adapters import AdapterSet
    from rag.local_generator.scheduler import Request

log = logging.getLogger(__name__)


class RunningBatch:
    """The rows being decoded, their shared KV cache, attention mask and positions.

    Lives on the worker thread. Rows of different lengths share one left-padded
    cache: ``mask`` (rows x cache length) marks the real columns, ``positions``
    holds each row's next position, so padding never changes a row's numbers
    (beyond float noise). Newcomers are prefilled on their own, then their cache
    is merged in (both sides left-padded to the longer one); finished rows are
    removed at once and all-padding columns trimmed.
    """

    def __init__(
        self, models: AdapterSet, tokenizer, eos_ids: frozenset[int], pad_id: int, prefill_chunk_tokens: int = 256
    ) -> None:
        self._models = models
        self._chunk = prefill_chunk_tokens
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._pad_id = pad_id
        self._device = models.input_device
        self.rows: list[Row] = []
        self._prefill: _Prefill | None = None
        self.adapter: str | None = None
        self._session = contextlib.ExitStack()  # the adapter stays active while the batch runs
        self._forward: Forward | None = None
        self._reset_tensors()

    def __len__(self) -> int:
        """Rows decoding plus rows being prefilled."""
        return len(self.rows) + (len(self._prefill.rows) if self._prefill else 0)

    def _reset_tensors(self) -> None:
        self._cache = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self._device)
        self._positions = torch.zeros(0, dtype=torch.long, device=self._device)
        self._last = torch.zeros(0, dtype=torch.long, device=self._device)

    # -- admitting

    @property
    def accepting(self) -> bool:
        """Whether newcomers may be admitted now (no other prompt is half prefilled)."""
        return self._prefill is None

    @torch.inference_mode()  # a prefix adapter's prompt is computed here: no autograd graph
    def admit(self, requests: list[Request]) -> list[Row]:
        """Start prefilling ``requests`` (same adapter as the batch; only when :attr:`accepting`);
        each :meth:`step` runs one chunk of it. Returns the rows that already left (on an error)."""
        rows = [Row(r, self._tokenizer, self._eos_ids) for r in requests]
        try:
            if not self.rows:
                self._start(requests[0].adapter)
            self._prefill = _Prefill(rows, self._forward, self._pad_id, self._device, self._chunk)
        except Exception as exc:  # only the newcomers are affected; the running rows go on
            _fail(rows, exc)
            if not self.rows:
                self._stop()
            return rows
        return []

    def _start(self, adapter: str | None) -> None:
        self.adapter = adapter
        model = self._session.enter_context(self._models.activated(adapter))
        self._forward = Forward.for_model(model)

    def _stop(self) -> None:
        self._session.close()
        self._session = contextlib.ExitStack()
        self._forward = None
        self._reset_tensors()

    def _prefill_one_chunk(self) -> list[Row]:
        """One chunk of the newcomers' prefill; they join the batch after their last. Returns rows that left."""
        prefill = self._prefill
        if prefill is None:
            return []
        try:
            if prefill.abandoned:  # every newcomer's client left: free the worker now
                for row in prefill.rows:
                    row.drop_if_cancelled()
                return self._end_prefill()
            if not prefill.advance():
                return []
        except Exception as exc:  # only the newcomers are affected; the running rows go on
            _fail(prefill.rows, exc)
            return self._end_prefill()
        self._prefill = None
        self._join(prefill.rows, prefill.cache, prefill.mask, prefill.next_positions)
        return self._advance(prefill.rows, prefill.logits)

    def _end_prefill(self) -> list[Row]:
        rows, self._prefill = self._prefill.rows, None
        if not self.rows:
            self._stop()
        return rows

    def _join(self, rows: list[Row], cache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self._cache.layers, cache.layers):
                mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
                mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
            self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self.rows += rows
        self._positions = torch.cat([self._positions, positions])
        self._last = torch.cat([self._last, torch.full((len(rows),), self._pad_id, dtype=torch.long, device=self._device)])

    # -- decoding

    @torch.inference_mode()
    def step(self, shutting_down: bool) -> list[Row]:
        """One decode step for every running row; returns the rows that left the batch."""
        if shutting_down:
            for row in self.rows:
                row.done = True  # aclose(): stop now; leaving reports the row as unfinished
            return self._leave(list(self.rows)) + self._close_prefill()
        # a cancelled row frees its slot before the next forward
        left = self._leave([row for row in self.rows if row.drop_if_cancelled()])
        left += self._prefill_one_chunk()
        if not self.rows:
            return left
        try:
            logits = self._decode()
        except Exception as exc:  # the batch's state is unknown now: fail every running row
            _fail(self.rows, exc)
            return left + self._leave(list(self.rows))
        return left + self._advance(self.rows, logits)

    def _decode(self) -> torch.Tensor:
        ones = torch.ones((len(self.rows), 1), dtype=torch.long, device=self._device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        logits = self._forward(self._last[:, None], self._mask, self._positions[:, None], self._cache)
        self._positions = self._positions + 1
        return logits

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> list[Row]:
        """Choose and accept each of ``rows``' next token, then remove every finished row."""
        offset = len(self.rows) - len(rows)  # ``rows`` are the last ones of the batch
        for i, row in enumerate(rows):
            if row.done:
                continue
            token = row.choose(logits[i])
            self._last[offset + i] = token
            row.accept(token)
        return self._leave([row for row in self.rows if row.done])

    def _leave(self, leaving: list[Row]) -> list[Row]:
        if not leaving:
            return []
        gone = set(map(id, leaving))
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        self.rows = [self.rows[i] for i in keep]
        for row in leaving:
            row.close()  # rows ended without a Finished (shutdown): an error; others: a no-op
        if not self.rows:
            if self._prefill is None:
                self._stop()
            else:  # the newcomers still need the adapter and the forward
                self._reset_tensors()
            return leaving
        index = torch.tensor(keep, dtype=torch.long, device=self._device)
        self._cache.batch_select_indices(index)
        self._mask, self._positions, self._last = self._mask[index], self._positions[index], self._last[index]
        self._trim_padding()
        return leaving

    def _trim_padding(self) -> None:
        # Columns only the departed rows used are padding for everyone left: drop them.
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        if first:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self._mask = self._mask[:, first:]

    def _close_prefill(self, error: GenerationError | None = None) -> list[Row]:
        if self._prefill is None:
            return []
        rows = self._prefill.rows
        for row in rows:
            if error:
                row.fail(error)
            else:
                row.close()  # reported as unfinished
        return self._end_prefill()

    @torch.inference_mode()
    def fail_all(self, error: GenerationError) -> list[Row]:
        for row in self.rows:
            row.fail(error)
        return self._leave(list(self.rows)) + self._close_prefill(error)


class _Prefill:
    """Newcomers' prompts, prefilled ``chunk`` columns per worker step.

    A CPU prefill of a few thousand tokens takes seconds; run in one go it
    would freeze every running stream for that long. One chunk per step, with
    a decode step of the running rows between, keeps their tokens coming, and
    a newcomer whose client left is given up at the next chunk.
    """

    def __init__(self, rows: list[Row], forward: Forward, pad_id: int, device, chunk: int) -> None:
        self.rows = rows
        prompts = [row.request.prompt_ids for row in rows]
        # Left padding keeps every row's last prompt token in the last column, where decoding starts.
        self._width = max(map(len, prompts))
        ids = torch.full((len(prompts), self._width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self._width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, self._width - len(prompt) :] = torch.tensor(prompt)
            mask[i, self._width - len(prompt) :] = 1
        self._ids, mask = ids.to(device), mask.to(device)
        self._positions = (mask.cumsum(-1) - 1).clamp(min=0) + forward.prefix_tokens
        self.cache = GrowingCache()
        if forward.prefix_cache is not None:
            self.cache = GrowingCache.holding(forward.prefix_cache(len(prompts)))
            prefix_mask = torch.ones((len(prompts), forward.prefix_tokens), dtype=torch.long, device=device)
            mask = torch.cat([prefix_mask, mask], dim=1)  # the prefix is attended to by every token
        self.mask = mask
        self._forward = forward
        self._before = forward.prefix_tokens  # mask columns ahead of the prompt's
        self._chunk = chunk
        self._done = 0  # prompt columns prefilled
        self.logits: torch.Tensor | None = None

    @property
    def abandoned(self) -> bool:
        return all(row.request.cancelled for row in self.rows)

    @property
    def next_positions(self) -> torch.Tensor:
        return self._positions[:, -1] + 1

    @torch.inference_mode()
    def advance(self) -> bool:
        """Prefill the next chunk; True once the whole prompt is in the cache."""
        start, end = self._done, min(self._width, self._done + self._chunk)
        self.logits = self._forward(
            self._ids[:, start:end], self.mask[:, : self._before + end], self._positions[:, start:end], self.cache
        )
        self._done = end
        return end == self._width


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zeros before ``tensor``'s columns along ``dim`` (the sequence axis) up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _fail(rows: list[Row], exc: Exception) -> None:
    log.error("generation failed for %d rows", len(rows), exc_info=exc)
    for row in rows:
        row.fail(GenerationError(f"generation failed: {type(exc).__name__}: {exc}"))
