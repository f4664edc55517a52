"""A transformers causal LM in this process, with PEFT adapters and a dynamic batcher.

::

    >>> gen = LocalGenerator.from_settings(Settings())                        # doctest: +SKIP
    >>> async for event in gen.stream([{"role": "user", "content": "Hi"}],    # doctest: +SKIP
    ...                               SamplingParams(max_tokens=16, temperature=0)):
    ...     print(event)

How a request travels. ``stream()`` renders the messages with the tokenizer's
chat template, checks the context window and puts the request in a bounded
waiting list (full: :class:`GeneratorOverloaded`). One worker thread owns the
model, so no two ``generate()`` calls ever overlap: it takes the oldest
waiting request plus up to ``max_batch_size - 1`` others asking for the same
adapter, left-pads them into one batch and runs ``model.generate()`` once.

``generate()`` runs greedy (``do_sample=False``); each row's own decoding is
done by :class:`_Row`, reached through the batch's logits processor
(:class:`_PickTokens`) and stopping criteria (:class:`_AcceptTokens`):

* the logits processor applies the row's presence/frequency penalties,
  temperature and top-p, draws the token from the row's own seeded
  ``torch.Generator`` and masks every other token, so argmax returns it. One
  random draw per step and row: a seeded request samples the same tokens
  whatever shares its batch. Doing this inside ``generate()`` (instead of a
  hand-written decoding loop) keeps every architecture and PEFT method, prefix
  tuning included, working as transformers and PEFT intend.
* the stopping criteria sees each new token first: it counts it,
  detokenises it incrementally, matches stop strings on the text, ends the row
  on EOS, stop string, ``max_tokens`` or cancellation, and pushes text to the
  request's asyncio queue (``loop.call_soon_threadsafe``). Deciding and
  emitting in the same place means a stop string ends the row on the very
  step that completes it, and text is never sent that a later stop string
  would have cut (a tail that could begin a stop string is held back).

Token counts in :class:`Finished`: ``prompt_tokens`` is the chat-template
rendering, generation prompt included; ``completion_tokens`` is every token
the model generated for the row, **the final EOS included** (it was decoded
like any other token), and the token that completed a stop string included.
With ``finish_reason == "length"`` it equals ``max_tokens``.

Requests that arrive while a batch runs wait for the next one (``generate()``
cannot take new rows mid-flight); a request cancelled while waiting is
dropped, one cancelled while running stops at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import torch
from transformers import LogitsProcessor, StoppingCriteria

from rag.bundled_generator import BUNDLED_FOLDER_NAME, resolve_generator_model
from rag.generation import (
    ContextOverflow,
    Finished,
    GenerationError,
    GenerationEvent,
    GeneratorOverloaded,
    Message,
    SamplingParams,
    TextDelta,
    UnknownAdapter,
)
from settings import BUNDLED_GENERATOR_MODEL, Settings

__all__ = ["GeneratorStats", "LocalGenerator", "encode_text", "render_chat"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratorStats:
    """A snapshot of the batcher, for tests, metrics and the readiness check."""

    ready: bool  # model loaded and worker alive
    queue_depth: int  # requests waiting for a batch
    running: int  # requests in the batch being decoded
    batches_run: int  # batches started
    requests_served: int  # requests that went through a batch (finished, cancelled or failed)
    largest_batch: int


# --------------------------------------------------------------------------
# the generator
# --------------------------------------------------------------------------


class LocalGenerator:
    """A :class:`rag.generation.Generator` backed by a local transformers model.

    ``model_path``: a causal-LM folder (see :func:`resolve_generator_model`).
    ``adapters``: ``{name: folder}`` of PEFT adapters (LoRA and prompt learning
    such as prefix tuning / P-Tuning v2 may be mixed), chosen per request by
    name; ``adapter=None`` is the bare base model.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_id: str | None = None,
        adapters: dict[str, str | Path] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        quantization: str = "none",
        max_batch_size: int = 8,
        queue_size: int = 64,
        batch_wait_s: float = 0.005,
    ) -> None:
        self.model_id = model_id or Path(model_path).name
        self.max_batch_size = max_batch_size
        self.queue_size = queue_size
        self.batch_wait_s = batch_wait_s
        self.device = _resolve_device(device)
        self.tokenizer = _load_tokenizer(model_path)
        base = _load_model(model_path, self.device, dtype, quantization)
        self._models = _AdapterSet(base, adapters or {})
        self.adapters = self._models.names
        self.context_window = _context_window(base, self.tokenizer)
        self._eos_ids = _eos_ids(base, self.tokenizer)
        self._pad_id = self.tokenizer.pad_token_id
        self._batcher = _Batcher(max_batch_size, queue_size, batch_wait_s, self._run_batch)

    @classmethod
    def from_settings(cls, settings: Settings) -> "LocalGenerator":
        path = resolve_generator_model(settings.generator_model, settings)
        return cls(
            path,
            model_id=_served_model_id(settings.generator_model),
            adapters=dict(settings.generator_adapters),
            device=settings.generator_device,
            dtype=settings.generator_dtype,
            quantization=settings.generator_quantization,
            max_batch_size=settings.generator_max_batch_size,
            queue_size=settings.generator_queue_size,
        )

    # ---------------------------------------------------------------- counting

    def render_prompt(self, messages: list[Message]) -> str:
        return render_chat(self.tokenizer, messages)

    def encode_prompt(self, messages: list[Message]) -> list[int]:
        return encode_text(self.tokenizer, self.render_prompt(messages))

    def count_prompt_tokens(self, messages: list[Message]) -> int:
        return len(self.encode_prompt(messages))

    def count_text_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---------------------------------------------------------------- serving

    def stats(self) -> GeneratorStats:
        return self._batcher.stats()

    @property
    def ready(self) -> bool:
        return self._batcher.stats().ready

    async def stream(
        self, messages: list[Message], params: SamplingParams, adapter: str | None = None
    ) -> AsyncIterator[GenerationEvent]:
        """Text deltas then one :class:`Finished`; closing the stream early cancels the request."""
        request = self._make_request(messages, params, adapter)
        self._batcher.submit(request)
        try:
            while True:
                item = await request.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            # Normal end: a no-op. Early close / task cancelled: stop the row or drop it from the queue.
            request.cancelled = True
            self._batcher.withdraw(request)

    async def complete(
        self, messages: list[Message], params: SamplingParams, adapter: str | None = None
    ) -> tuple[str, Finished]:
        """The whole reply at once: the concatenated deltas of :meth:`stream`."""
        parts: list[str] = []
        async for event in self.stream(messages, params, adapter):
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                return "".join(parts), event
        raise GenerationError("generation ended without a Finished event")

    async def aclose(self) -> None:
        await asyncio.to_thread(self._batcher.close)

    def _make_request(self, messages: list[Message], params: SamplingParams, adapter: str | None) -> "_Request":
        _validate(params)
        if adapter is not None and adapter not in self.adapters:
            raise UnknownAdapter(adapter, self.adapters)
        prompt_ids = self.encode_prompt(messages)
        if len(prompt_ids) + params.max_tokens > self.context_window:
            raise ContextOverflow(len(prompt_ids), params.max_tokens, self.context_window)
        return _Request(prompt_ids, params, adapter, asyncio.get_running_loop())

    # ---------------------------------------------------------------- worker side

    def _run_batch(self, requests: list["_Request"]) -> None:
        """Decode ``requests`` (same adapter) in one ``generate()`` call; runs on the worker thread."""
        rows = [_Row(r, self.tokenizer, self._eos_ids) for r in requests]
        try:
            input_ids, attention_mask = self._left_padded([r.prompt_ids for r in requests])
            config = self._generation_config(max(r.params.max_tokens for r in requests))
            with torch.inference_mode(), self._models.activated(requests[0].adapter) as model:
                model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=[_PickTokens(rows, self._pad_id)],
                    stopping_criteria=[_AcceptTokens(rows, self._batcher.shutting_down)],
                )
        except Exception as exc:  # every row learns about it; none is left hanging
            log.exception("generation failed for a batch of %d", len(rows))
            for row in rows:
                row.fail(GenerationError(f"generation failed: {type(exc).__name__}: {exc}"))
        finally:
            for row in rows:
                row.close()  # rows generate() left unfinished (shutdown): end with an error

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        # Left padding keeps every row's last prompt token in the last column, where decoding starts.
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        device = self._models.input_device
        return ids.to(device), mask.to(device)

    def _generation_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        # A clean config: the model's own defaults (sampling, repetition penalty) must not
        # leak in; all decoding choices are made per row by _Row.
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=sorted(self._eos_ids),
            pad_token_id=self._pad_id,
            bos_token_id=self.tokenizer.bos_token_id,
            use_cache=True,
        )


def render_chat(tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """The chat-template rendering of ``messages``: the one function serving and ``finetune/`` share."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_text(tokenizer, text: str) -> list[int]:
    # The template already writes the special tokens (BOS, role markers): add none.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _served_model_id(name: str) -> str:
    """What /v1/models lists: the bundled model's short name, a folder's name, or the hub id."""
    if name == BUNDLED_GENERATOR_MODEL:
        return BUNDLED_FOLDER_NAME
    path = Path(name).expanduser()
    return path.name if path.exists() else name


def _validate(params: SamplingParams) -> None:
    if params.max_tokens < 1:
        raise GenerationError(f"max_tokens must be at least 1, not {params.max_tokens}")
    if params.temperature < 0 or not math.isfinite(params.temperature):
        raise GenerationError(f"temperature must be >= 0, not {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], not {params.top_p}")


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU half precision is slow or unsupported for many kernels


def _load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tokenizer.chat_template:
        raise GenerationError(f"{path}: the tokenizer has no chat template; serve an instruction-tuned (chat) model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out anyway
    tokenizer.padding_side = "left"
    return tokenizer


def _load_model(path: str | Path, device: str, dtype: str, quantization: str):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype, device), "local_files_only": True}
    if device.startswith("cuda"):
        # one GPU named: everything on it; plain "cuda": let accelerate spread a large model
        kwargs["device_map"] = "auto" if device == "cuda" else {"": device}
    if quantization != "none":
        kwargs["quantization_config"] = _bitsandbytes_config(quantization, device, kwargs["dtype"])
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if not device.startswith("cuda"):
        model.to(device)
    return model.eval()


def _bitsandbytes_config(quantization: str, device: str, compute_dtype: torch.dtype):
    if not device.startswith("cuda"):
        raise GenerationError(
            f"generator_quantization={quantization!r} needs a CUDA GPU (bitsandbytes); on CPU use 'none'"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise GenerationError(f"generator_quantization={quantization!r} needs bitsandbytes: pip install 'zhiku[cuda]'") from exc
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def _context_window(model, tokenizer) -> int:
    window = getattr(model.config, "max_position_embeddings", None)
    if not window:
        window = tokenizer.model_max_length if tokenizer.model_max_length < 10**7 else 2048
    return int(window)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    """Every token that ends a reply: the generation config's (chat models often list several) and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    if not ids:
        raise GenerationError("the model defines no end-of-sequence token")
    return frozenset(ids)


class _AdapterSet:
    """The base model plus PEFT adapters, one of which is active per batch.

    PEFT keeps one adapter type per ``PeftModel``, so adapters are grouped by
    type, each group one ``PeftModel`` over the *same* base (weights are never
    copied). Injected adapters (LoRA, ...) live inside the base's layers and
    are switched off while another group or the bare base runs; prompt
    learning (prefix tuning, P-Tuning v2, prompt tuning) wraps the forward
    pass and touches no layer. At most one injected type can be served.
    """

    def __init__(self, base, adapters: dict[str, str | Path]) -> None:
        from peft import PeftConfig

        self.base = base
        self.input_device = base.get_input_embeddings().weight.device
        self._groups: dict[str, Any] = {}  # peft type -> PeftModel
        self._group_of: dict[str, str] = {}  # adapter name -> peft type
        configs = {name: PeftConfig.from_pretrained(str(folder)) for name, folder in adapters.items()}
        injected = {str(c.peft_type) for c in configs.values() if not c.is_prompt_learning}
        if len(injected) > 1:
            raise GenerationError(f"adapters of several layer-injecting types cannot share a base: {sorted(injected)}")
        # Injected types first: prompt-learning wrappers then see the final layers.
        for name in sorted(configs, key=lambda n: configs[n].is_prompt_learning):
            self._load(name, Path(adapters[name]), configs[name])
        self.names: tuple[str, ...] = tuple(adapters)

    def _load(self, name: str, folder: Path, config) -> None:
        from peft import PeftModel

        kind = str(config.peft_type)
        if kind in self._groups:
            self._groups[kind].load_adapter(str(folder), adapter_name=name, is_trainable=False)
        else:
            self._groups[kind] = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name, is_trainable=False)
        self._groups[kind].eval()
        self._group_of[name] = kind

    @contextlib.contextmanager
    def activated(self, adapter: str | None) -> Iterator[Any]:
        """The model to call ``generate()`` on with ``adapter`` active (None: the bare base)."""
        wanted = self._group_of.get(adapter) if adapter else None
        with contextlib.ExitStack() as stack:
            for kind, peft_model in self._groups.items():
                if kind != wanted and not peft_model.peft_config[peft_model.active_adapter].is_prompt_learning:
                    stack.enter_context(peft_model.disable_adapter())
            if wanted is None:
                yield self.base
            else:
                peft_model = self._groups[wanted]
                peft_model.set_adapter(adapter)
                yield peft_model


# --------------------------------------------------------------------------
# requests and the waiting list
# --------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the consumer's side; read by the worker each step

    def send(self, item: GenerationEvent | BaseException) -> None:
        """Hand an event to the consumer's event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            self.cancelled = True


class _Batcher:
    """The bounded waiting list and the one worker thread that owns the model."""

    def __init__(self, max_batch_size: int, queue_size: int, batch_wait_s: float, run_batch) -> None:
        self._max_batch = max_batch_size
        self._queue_size = queue_size
        self._batch_wait_s = batch_wait_s
        self._run_batch = run_batch
        self._waiting: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.shutting_down = threading.Event()  # read by running batches: stop at the next step
        self._running = 0
        self._batches = 0
        self._served = 0
        self._largest = 0
        self._seconds_per_batch = 1.0  # running estimate, for Retry-After
        self._thread = threading.Thread(target=self._work, name="zhiku-generator", daemon=True)
        self._thread.start()

    def submit(self, request: _Request) -> None:
        with self._cond:
            if self._closing:
                raise GenerationError("the generator is shut down")
            if len(self._waiting) >= self._queue_size:
                batches_ahead = 1 + len(self._waiting) // self._max_batch
                raise GeneratorOverloaded(
                    f"{len(self._waiting)} requests are already waiting for the generator",
                    retry_after=max(1.0, round(batches_ahead * self._seconds_per_batch, 1)),
                )
            self._waiting.append(request)
            self._cond.notify()

    def withdraw(self, request: _Request) -> None:
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

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            started = time.perf_counter()
            try:
                self._run_batch(batch)
            except Exception:  # _run_batch reports to its rows; the worker must survive anything
                log.exception("generator worker: unexpected error")
            with self._cond:
                self._running = 0
                self._served += len(batch)
                elapsed = time.perf_counter() - started
                self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * elapsed

    def _next_batch(self) -> list[_Request] | None:
        """Wait for work; then the oldest live request and the next ones with the same adapter."""
        with self._cond:
            deadline = None
            while True:
                self._drop_cancelled()
                if self._closing:
                    return None
                if not self._waiting:
                    deadline = None
                    self._cond.wait()
                    continue
                # a short window after the first arrival lets requests sent together share a batch
                deadline = deadline or time.monotonic() + self._batch_wait_s
                remaining = deadline - time.monotonic()
                if len(self._waiting) < self._max_batch and remaining > 0:
                    self._cond.wait(remaining)
                    continue
                return self._take_batch()

    def _take_batch(self) -> list[_Request]:
        adapter = self._waiting[0].adapter
        batch = [r for r in self._waiting if r.adapter == adapter][: self._max_batch]
        for request in batch:
            self._waiting.remove(request)
        self._running = len(batch)
        self._batches += 1  # counted when started: a test sees the batch while it runs
        self._largest = max(self._largest, len(batch))
        return batch

    def _drop_cancelled(self) -> None:
        live = [r for r in self._waiting if not r.cancelled]
        if len(live) != len(self._waiting):
            self._waiting = deque(live)


# --------------------------------------------------------------------------
# one row of a batch: sampling, detokenising, stop strings, events
# --------------------------------------------------------------------------


class _Detokenizer:
    """Incremental decoding that only ever emits complete characters.

    Decodes a short window of recent tokens twice (without and with the new
    ones) and emits the difference: a window keeps the cost per token
    constant, and starting it at an earlier token keeps tokenizer-specific
    spacing of the window's first token out of the delta. A delta ending in
    U+FFFD is an unfinished multi-byte character: wait for more tokens.
    """

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._start = 0  # window start
        self._done = 0  # tokens whose text has been emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is left, unfinished characters included (the row is ending)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self._ids[self._start : self._done])
        after = self._decode(self._ids[self._start :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._start, self._done = self._done, len(self._ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class _Row:
    """One request inside a running batch."""

    def __init__(self, request: _Request, tokenizer, eos_ids: frozenset[int]) -> None:
        self.request = request
        self.params = request.params
        self.eos_ids = eos_ids
        self.done = False  # no more tokens wanted
        self._reported = False  # Finished or an error was sent
        self.generated: list[int] = []  # completion tokens, EOS excluded (for penalties)
        self.completion_tokens = 0  # EOS included
        self.rng: torch.Generator | None = None
        self._detok = _Detokenizer(tokenizer)
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

    def accept(self, token: int) -> None:
        """The token generate() just appended for this row."""
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


class _PickTokens(LogitsProcessor):
    """Logits processor: each live row's own sampling, the rest of the vocabulary masked."""

    def __init__(self, rows: list[_Row], pad_id: int) -> None:
        self.rows = rows
        self.pad_id = pad_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = torch.full_like(scores, -math.inf)
        for i, row in enumerate(self.rows):
            token = self.pad_id if row.done else row.choose(scores[i])
            chosen[i, token] = 0.0  # argmax (do_sample=False) returns exactly this token
        return chosen


class _AcceptTokens(StoppingCriteria):
    """Stopping criteria: hands each live row its new token; a row is finished when it says so."""

    def __init__(self, rows: list[_Row], shutting_down: threading.Event) -> None:
        self.rows = rows
        self.shutting_down = shutting_down

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if self.shutting_down.is_set():
                row.done = True  # aclose(): stop now; _run_batch reports the row as unfinished
            elif not row.done:
                row.accept(token)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)
