"""LocalGenerator: the :class:`rag.generation.Generator` the rest of zhiku talks to.

It loads the model, validates and counts each request, and hands it to the
batcher; its ``stream()`` relays the events the worker sends back.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import AsyncIterator

from models.torch_device import resolve_device
from models.bundled_generator import resolve_generator_model
from rag.chat_template import context_window, encode_chat, encode_text, load_chat_tokenizer, render_chat
from rag.generation import (
    ContextOverflow,
    Finished,
    GenerationError,
    GenerationEvent,
    Message,
    SamplingParams,
    TextDelta,
    UnknownAdapter,
)
from rag.local_generator.cpu_quantised import quantise_linear_layers
from rag.local_generator.adapters import AdapterSet
from rag.local_generator.batch import RunningBatch
from rag.local_generator.loading import eos_ids, load_model
from rag.local_generator.scheduler import Batcher, GeneratorStats, Request
from settings import Settings


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
        self.tokenizer = load_chat_tokenizer(model_path)
        base = load_model(model_path, self.device, dtype, quantization)
        self.models = AdapterSet(base, adapters or {})
        if quantization != "none" and not self.device.startswith("cuda"):
            quantise_linear_layers(base, bits=8 if quantization == "8bit" else 4)
        self.adapters = self.models.names
        self.context_window = context_window(base.config, self.tokenizer)
        self.eos_ids = eos_ids(base, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        on_gpu = self.device.startswith("cuda")
        # CPU prefill chunks of 256 tokens take well under a second: the longest a running
        # stream waits for its next token while another prompt is prefilled (see _Prefill)
        running = RunningBatch(self.models, self.tokenizer, self.eos_ids, self.pad_id, 8192 if on_gpu else 256)
        self.prefill_tokens = prefill_tokens or (8192 if on_gpu else 512)
        self._batcher = Batcher(max_batch_size, queue_size, batch_wait_s, running, self.prefill_tokens)

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
        return encode_chat(self.tokenizer, messages)

    def count_prompt_tokens(self, messages: list[Message]) -> int:
        return len(self.encode_prompt(messages))

    def count_text_tokens(self, text: str) -> int:
        return len(encode_text(self.tokenizer, text))

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

    def _make_request(self, messages: list[Message], params: SamplingParams, adapter: str | None) -> Request:
        _validate(params)
        if adapter is not None and adapter not in self.adapters:
            raise UnknownAdapter(adapter, self.adapters)
        prompt_ids = self.encode_prompt(messages)
        if len(prompt_ids) + params.max_tokens > self.context_window:
            raise ContextOverflow(len(prompt_ids), params.max_tokens, self.context_window)
        return Request(prompt_ids, params, adapter, asyncio.get_running_loop())


def _served_model_id(name: str) -> str:
    """What /v1/models lists: the bundled model's short name, a folder's name, or the hub id."""
    from models.bundled_generator import served_model_id

    return served_model_id(name)


def _validate(params: SamplingParams) -> None:
    if params.max_tokens < 1:
        raise GenerationError(f"max_tokens must be at least 1, not {params.max_tokens}")
    if params.temperature < 0 or not math.isfinite(params.temperature):
        raise GenerationError(f"temperature must be >= 0, not {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], not {params.top_p}")
