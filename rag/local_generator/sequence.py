"""One row of the running batch: sampling its tokens, detokenising, stop strings, sending events.

* :meth:`Row.choose` applies the row's presence/frequency penalties,
  temperature and top-p and draws the token from the row's own seeded
  ``torch.Generator``. One random draw per step and row: a seeded request
  samples the same tokens whatever shares its batch. Greedy rows alone give
  exactly what ``generate()`` gives.
* :meth:`Row.accept` sees each new token first: it counts it, detokenises it
  incrementally, matches stop strings on the text, ends the row on EOS, stop
  string, ``max_tokens`` or cancellation, and pushes text to the request's
  asyncio queue. Deciding and emitting in the same place means a stop string
  ends the row on the very step that completes it, and text is never sent that
  a later stop string would have cut (a tail that could begin a stop string is
  held back).
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING

import torch

from rag.generation import Finished, GenerationError, TextDelta
from rag.local_generator.detokenizer import Detokenizer

if TYPE_CHECKING:
    from rag.local_generator.scheduler import Request


class Row:
    """One request inside a running batch."""

    def __init__(self, request: Request, tokenizer, eos_ids: frozenset[int]) -> None:
        self.request = request
        self.params = request.params
        self.eos_ids = eos_ids
        self.done = False  # no more tokens wanted
        self._reported = False  # Finished or an error was sent
        self.generated: list[int] = []  # completion tokens, EOS excluded (for penalties)
        self.completion_tokens = 0  # EOS included
        self.rng: torch.Generator | None = None
        self.admitted_at = time.perf_counter()
        self._detok = Detokenizer(tokenizer)
        self._text = ""  # decoded completion so far
        self._sent = 0  # characters of _text already sent
        self._stops = tuple(s for s in self.params.stop if s)

    # -- sampling (logits processor side)

    def choose(self, logits: torch.Tensor) -> int:
        """The row's next token from its raw next-token logits (float32, one row)."""
        logits = self._penalised(logits)
        if self.params.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.params.temperature, dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        if self.params.top_p < 1:
            # keep the smallest prefix whose mass reaches top_p (at least one token)
            keep = int(torch.searchsorted(cumulative, torch.tensor([self.params.top_p], device=cumulative.device))) + 1
            cumulative = cumulative[:keep]
        # inverse-CDF draw: exactly one random number per step, from the row's own generator
        u = torch.rand(1, generator=self._generator(logits.device), device=logits.device) * cumulative[-1]
        index = min(int(torch.searchsorted(cumulative, u)), cumulative.numel() - 1)
        return int(order[index])

    def _penalised(self, logits: torch.Tensor) -> torch.Tensor:
        presence, frequency = self.params.presence_penalty, self.params.frequency_penalty
        if not self.generated or (presence == 0 and frequency == 0):
            return logits
        counts = torch.bincount(torch.tensor(self.generated, device=logits.device), minlength=logits.numel())
        counts = counts[: logits.numel()].to(logits.dtype)
        return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.rng is None:
            seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
            self.rng = torch.Generator(device=device)
            self.rng.manual_seed(seed % (1 << 64))
        return self.rng

    # -- accepting tokens (stopping criteria side)

    def drop_if_cancelled(self) -> bool:
        """End silently if the consumer went away; True when the row is done."""
        if self.request.cancelled and not self.done:
            self.done = self._reported = True
        return self.done

    def accept(self, token: int) -> None:
        """The token just chosen for this row."""
        if self.request.cancelled:
            self.done = self._reported = True  # nobody listens: end silently
            return
        self.completion_tokens += 1
        if token in self.eos_ids:
            self._finish("stop")
            return
        self.generated.append(token)
        self._add_text(self._detok.push(token))
        if not self.done and self.completion_tokens >= self.params.max_tokens:
            self._finish("length")

    def _add_text(self, delta: str) -> None:
        if not delta:
            return
        self._text += delta
        cut = self._first_stop()
        if cut is not None:
            self._text = self._text[:cut]
            self._end("stop")
        else:
            self._send_upto(len(self._text) - self._held_back())

    def _first_stop(self) -> int | None:
        # Text already sent never holds the start of a stop string (see _held_back).
        hits = [i for i in (self._text.find(s, self._sent) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest unsent tail that could be the beginning of a stop string."""
        unsent = len(self._text) - self._sent
        for length in range(min(unsent, max((len(s) for s in self._stops), default=1) - 1), 0, -1):
            tail = self._text[-length:]
            if any(s.startswith(tail) for s in self._stops):
                return length
        return 0

    def _finish(self, reason: str) -> None:
        """End on EOS or max_tokens: the last undecoded bytes are text too (and may complete a stop)."""
        self._add_text(self._detok.flush())
        if not self.done:
            self._end(reason)

    def _end(self, reason: str) -> None:
        self._send_upto(len(self._text))
        self.done = self._reported = True
        self.request.send(Finished(reason, len(self.request.prompt_ids), self.completion_tokens))  # type: ignore[arg-type]

    def _send_upto(self, end: int) -> None:
        if end > self._sent:
            self.request.send(TextDelta(self._text[self._sent : end]))
            self._sent = end

    # -- failures

    def fail(self, error: GenerationError) -> None:
        if not self._reported:
            self.done = self._reported = True
            self.request.send(error)

    def close(self) -> None:
        self.fail(GenerationError("the generator stopped before this reply was complete"))
