"""A transformers causal LM in this process, with PEFT adapters and a dynamic batcher.

::

    >>> gen = LocalGenerator.from_settings(Settings())                        # doctest: +SKIP
    >>> async for event in gen.stream([{"role": "user", "content": "Hi"}],    # doctest: +SKIP
    ...                               SamplingParams(max_tokens=16, temperature=0)):
    ...     print(event)

How a request travels. ``stream()`` renders the messages with the tokenizer's
chat template, checks the context window and puts the request in a bounded
waiting list (full: :class:`GeneratorOverloaded`). One worker thread owns the
model and batches continuously (iteration-level): between two decode steps it
admits waiting requests into free slots of the running batch (at most
``max_batch_size`` rows), prefilling them together, left-padded, up to
``prefill_tokens`` prompt tokens per step (one request at a time on a CPU,
where a prefill is compute-bound); a row that
finishes or is cancelled leaves the batch at once. So a request that arrives
while others decode starts after one step, not after the longest of them.

All rows of the running batch share one adapter (:class:`_RunningBatch`); a
request for another adapter waits until the batch drains, and once such a
request has waited ``starvation_s`` no more same-adapter newcomers are admitted.
An idle worker takes the oldest request's adapter, after a short window
(``batch_wait_s``) that lets requests sent together start together.

The decode loop is ours (not ``generate()``): one batched KV cache, a 2-D
attention mask and explicit positions per row, so rows of different lengths
and ages share each forward pass. Each row's own decoding is done by
:class:`_Row`:

* :meth:`_Row.choose` applies the row's presence/frequency penalties,
  temperature and top-p and draws the token from the row's own seeded
  ``torch.Generator``. One random draw per step and row: a seeded request
  samples the same tokens whatever shares its batch. Greedy rows alone give
  exactly what ``generate()`` gives (same positions, same masks, same kernels).
* :meth:`_Row.accept` sees each new token first: it counts it,
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

A request cancelled while waiting is dropped; one cancelled while running
leaves the batch before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
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
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from memory.torch_device import cpu_has_fast_bf16, resolve_device
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
    queue_depth: int  # requests waiting for a batch slot
    running: int  # rows currently decoding
    batches_run: int  # batches started from idle (requests joining a running batch do not count)
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
        prefill_tokens: int | None = None,
    ) -> None:
        self.model_id = model_id or Path(model_path).name
        self.max_batch_size = max_batch_size
        self.queue_size = queue_size
        self.batch_wait_s = batch_wait_s
        self.device = resolve_device(device)
        self.tokenizer = _load_tokenizer(model_path)
        base = _load_model(model_path, self.device, dtype, quantization)
        self._models = _AdapterSet(base, adapters or {})
        self.adapters = self._models.names
        self.context_window = _context_window(base, self.tokenizer)
        self._eos_ids = _eos_ids(base, self.tokenizer)
        self._pad_id = self.tokenizer.pad_token_id
        running = _RunningBatch(self._models, self.tokenizer, self._eos_ids, self._pad_id)
        self.prefill_tokens = prefill_tokens or (8192 if self.device.startswith("cuda") else 512)
        self._batcher = _Batcher(max_batch_size, queue_size, batch_wait_s, running, self.prefill_tokens)

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
            prefill_tokens=settings.generator_prefill_tokens,
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


def render_chat(tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """The chat-template rendering of ``messages``: the one function serving and ``finetune/`` share."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_text(tokenizer, text: str) -> list[int]:
    # The template already writes the special tokens (BOS, role markers): add none.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _served_model_id(name: str) -> str:
    """What /v1/models lists: the bundled model's short name, a folder's name, or the hub id."""
    from rag.bundled_generator import served_model_id

    return served_model_id(name)


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


def generator_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype the generator runs in for the ``generator_dtype`` setting on ``device``."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # CPU: bf16 where the matmuls are native (1.8x faster prefill, same answer likelihood:
    # docs/BENCHMARKS.md, generator precision); elsewhere CPU half precision is slow
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


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

    kwargs: dict[str, Any] = {"dtype": generator_dtype(dtype, device), "local_files_only": True}
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
        """The model to run with ``adapter`` active (None: the bare base)."""
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
    arrived: float = field(default_factory=time.monotonic)  # for the adapter starvation bound

    def send(self, item: GenerationEvent | BaseException) -> None:
        """Hand an event to the consumer's event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            self.cancelled = True


class _Batcher:
    """The bounded waiting list and the one worker thread that owns the model.

    The worker alternates between admitting waiting requests into the running
    batch (free slots, same adapter) and one decode step of that batch.
    """

    def __init__(
        self,
        max_batch_size: int,
        queue_size: int,
        batch_wait_s: float,
        batch: _RunningBatch,
        prefill_tokens: int,
        starvation_s: float = 2.0,
    ) -> None:
        self._max_batch = max_batch_size
        self._queue_size = queue_size
        self._batch_wait_s = batch_wait_s
        self._starvation_s = starvation_s
        self._prefill_tokens = prefill_tokens
        self._batch = batch
        self._waiting: deque[_Request] = deque()
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

    def submit(self, request: _Request) -> None:
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

    # ---------------------------------------------------------------- worker thread

    def _work(self) -> None:
        while (newcomers := self._next_admission()) is not None:
            left: list[_Row] = []
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

    def _account(self, left: list[_Row]) -> None:
        now = time.perf_counter()
        with self._cond:
            self._running = len(self._batch)
            self._served += len(left)
            for row in left:
                self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * (now - row.admitted_at)

    def _next_admission(self) -> list[_Request] | None:
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

    def _take(self, free: int) -> list[_Request]:
        """Up to ``free`` waiting requests for the running batch's adapter (the oldest's when idle)."""
        if free <= 0 or not self._waiting:
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

    def _within_prefill_budget(self, candidates: list[_Request]) -> list[_Request]:
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


# --------------------------------------------------------------------------
# the running batch: prefill newcomers, one decode step at a time
# --------------------------------------------------------------------------


@dataclass
class _Forward:
    """How to call the model for the running batch's adapter.

    Prefix tuning (P-Tuning v2) is served by calling the *base* model with the
    adapter's prefix as the start of the KV cache: PEFT's own forward would
    replace the cache with a fresh prefix on every call. Like ``generate()``
    through PEFT, the prefix counts in the positions (``prefix_tokens`` offset).
    """

    model: Any
    prefix_tokens: int = 0
    prefix_cache: Any = None  # batch size -> a Cache holding the prefix, or None
    cache_keyword: str = field(init=False)  # looked up once per batch, not per decode step

    def __post_init__(self) -> None:
        self.cache_keyword = _cache_keyword(_base_of(self.model))

    @classmethod
    def for_model(cls, model) -> "_Forward":
        config = getattr(model, "active_peft_config", None)
        if config is None or not config.is_prompt_learning:
            return cls(model)  # base model, or injected (LoRA) layers active inside it
        from peft import PeftType

        if config.peft_type != PeftType.PREFIX_TUNING:
            raise GenerationError(f"{config.peft_type} adapters are not supported; use LoRA or prefix tuning")
        return cls(model.get_base_model(), config.num_virtual_tokens, lambda n: model.get_prompt(batch_size=n, max_cache_len=-1))

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Float32 next-token logits (rows, vocab) of the last column."""
        # An all-ones mask is passed as None, as generate() does: same kernels, same numbers alone.
        mask = None if bool(attention_mask.all()) else attention_mask
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
            use_cache=True, logits_to_keep=1, **{self.cache_keyword: cache},
        )  # fmt: skip
        return out.logits[:, -1, :].float()


def _base_of(model):
    """The transformers model under a PEFT wrapper (which passes the cache on by keyword)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def _cache_keyword(model) -> str:
    """``cache`` on newer transformers 5.x, ``past_key_values`` before (the old name is going away)."""
    forward = getattr(type(model), "forward", None)
    takes = inspect.signature(forward).parameters if forward is not None else {}
    return "cache" if "cache" in takes else "past_key_values"


class _RunningBatch:
    """The rows being decoded, their shared KV cache, attention mask and positions.

    Lives on the worker thread. Rows of different lengths share one left-padded
    cache: ``mask`` (rows x cache length) marks the real columns, ``positions``
    holds each row's next position, so padding never changes a row's numbers
    (beyond float noise). Newcomers are prefilled on their own, then their cache
    is merged in (both sides left-padded to the longer one); finished rows are
    removed at once and all-padding columns trimmed.
    """

    def __init__(self, models: "_AdapterSet", tokenizer, eos_ids: frozenset[int], pad_id: int) -> None:
        self._models = models
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._pad_id = pad_id
        self._device = models.input_device
        self.rows: list[_Row] = []
        self.adapter: str | None = None
        self._session = contextlib.ExitStack()  # the adapter stays active while the batch runs
        self._forward: _Forward | None = None
        self._reset_tensors()

    def __len__(self) -> int:
        return len(self.rows)

    def _reset_tensors(self) -> None:
        self._cache = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self._device)
        self._positions = torch.zeros(0, dtype=torch.long, device=self._device)
        self._last = torch.zeros(0, dtype=torch.long, device=self._device)

    # -- admitting

    @torch.inference_mode()
    def admit(self, requests: list[_Request]) -> list[_Row]:
        """Prefill ``requests`` (same adapter as the batch), join them; returns the rows that already left."""
        rows = [_Row(r, self._tokenizer, self._eos_ids) for r in requests]
        try:
            if not self.rows:
                self._start(requests[0].adapter)
            logits, cache, mask, positions = self._prefill([r.prompt_ids for r in requests])
        except Exception as exc:  # only the newcomers are affected; the running rows go on
            _fail(rows, exc)
            if not self.rows:
                self._stop()
            return rows
        self._join(rows, cache, mask, positions)
        return self._advance(rows, logits)

    def _start(self, adapter: str | None) -> None:
        self.adapter = adapter
        model = self._session.enter_context(self._models.activated(adapter))
        self._forward = _Forward.for_model(model)

    def _stop(self) -> None:
        self._session.close()
        self._session = contextlib.ExitStack()
        self._forward = None
        self._reset_tensors()

    def _prefill(self, prompts: list[list[int]]):
        # Left padding keeps every row's last prompt token in the last column, where decoding starts.
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        forward = self._forward
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + forward.prefix_tokens
        cache = _GrowingCache()
        if forward.prefix_cache is not None:
            cache = _GrowingCache.holding(forward.prefix_cache(len(prompts)))
            prefix_mask = torch.ones((len(prompts), forward.prefix_tokens), dtype=torch.long, device=self._device)
            mask = torch.cat([prefix_mask, mask], dim=1)  # the prefix is attended to by every token
        logits = forward(ids, mask, positions, cache)
        return logits, cache, mask, positions[:, -1] + 1

    def _join(self, rows: list[_Row], cache, mask: torch.Tensor, positions: torch.Tensor) -> None:
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
    def step(self, shutting_down: bool) -> list[_Row]:
        """One decode step for every running row; returns the rows that left the batch."""
        if shutting_down:
            for row in self.rows:
                row.done = True  # aclose(): stop now; leaving reports the row as unfinished
            return self._leave(list(self.rows))
        # a cancelled row frees its slot before the next forward
        left = self._leave([row for row in self.rows if row.drop_if_cancelled()])
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

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> list[_Row]:
        """Choose and accept each of ``rows``' next token, then remove every finished row."""
        offset = len(self.rows) - len(rows)  # ``rows`` are the last ones of the batch
        for i, row in enumerate(rows):
            if row.done:
                continue
            token = row.choose(logits[i])
            self._last[offset + i] = token
            row.accept(token)
        return self._leave([row for row in self.rows if row.done])

    def _leave(self, leaving: list[_Row]) -> list[_Row]:
        if not leaving:
            return []
        gone = set(map(id, leaving))
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        self.rows = [self.rows[i] for i in keep]
        for row in leaving:
            row.close()  # rows ended without a Finished (shutdown): an error; others: a no-op
        if not self.rows:
            self._stop()
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

    @torch.inference_mode()
    def fail_all(self, error: GenerationError) -> list[_Row]:
        for row in self.rows:
            row.fail(error)
        return self._leave(list(self.rows))


class _GrowingLayer(DynamicLayer):
    """A cache layer that appends into spare room instead of concatenating.

    ``DynamicLayer`` copies its whole cache (``torch.cat``) on every decode
    step: at 8 rows of 500 tokens that copy was half the step's time. Here
    ``keys``/``values`` are views of a larger buffer and a step writes one
    column. Whoever replaces ``keys`` (merging newcomers, dropping rows or
    padding) just makes the next update adopt the new tensor into a fresh buffer.
    """

    _spare_min = 256  # columns of room added when the buffer is full

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.get_seq_length()
        new = old + key_states.shape[-2]
        if not self._owns_views() or new > self._key_buffer.shape[-2]:
            self._regrow(old, new, key_states)
        self._key_buffer[:, :, old:new] = key_states
        self._value_buffer[:, :, old:new] = value_states
        self.keys, self.values = self._key_buffer[:, :, :new], self._value_buffer[:, :, :new]
        return self.keys, self.values

    def _owns_views(self) -> bool:
        buffer = self._key_buffer
        return (
            buffer is not None
            and self.keys.data_ptr() == buffer.data_ptr()
            and self.keys.shape[0] == buffer.shape[0]
            and self.keys.stride() == buffer.stride()
        )

    def _regrow(self, old: int, new: int, like: torch.Tensor) -> None:
        shape = list(like.shape)
        shape[-2] = new + max(self._spare_min, new // 2)
        keys, values = like.new_empty(shape), like.new_empty(shape)
        if old:
            keys[:, :, :old], values[:, :, :old] = self.keys, self.values
        self._key_buffer, self._value_buffer = keys, values


class _GrowingCache(DynamicCache):
    """A :class:`DynamicCache` of :class:`_GrowingLayer` (what the running batch decodes with)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=_GrowingLayer)

    @classmethod
    def holding(cls, cache: Cache) -> "_GrowingCache":
        """A growing copy of ``cache`` (a prefix-tuning adapter's virtual tokens)."""
        grown = cls()
        for index, layer in enumerate(cache.layers):
            grown.update(layer.keys, layer.values, index)
        return grown


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zeros before ``tensor``'s columns along ``dim`` (the sequence axis) up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _fail(rows: list["_Row"], exc: Exception) -> None:
    log.error("generation failed for %d rows", len(rows), exc_info=exc)
    for row in rows:
        row.fail(GenerationError(f"generation failed: {type(exc).__name__}: {exc}"))



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
        self.admitted_at = time.perf_counter()
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
