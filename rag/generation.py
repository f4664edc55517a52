"""The generator interface: what ``rag/`` and ``api/`` need from a language model.

Two backends implement it: :class:`rag.local_generator.LocalGenerator` (a
transformers causal LM in this process, PEFT adapters, a dynamic batcher) and
:class:`rag.upstream_generator.UpstreamGenerator` (any OpenAI-compatible server).

A generation is an async stream of :class:`TextDelta` events ended by exactly one
:class:`Finished`. Closing the stream early (``aclose()``, task cancellation, a
client that disconnects) cancels the generation and frees its batch slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Literal, Protocol, Union

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters, OpenAI semantics.

    ``temperature == 0`` means greedy. ``seed`` makes sampling reproducible per
    request, independent of what else shares the batch.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    """The last event of a generation. Token counts are exact for the local backend."""

    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


GenerationEvent = Union[TextDelta, Finished]


class GenerationError(Exception):
    """Base of the errors a generator raises for a request it cannot serve."""


class GeneratorOverloaded(GenerationError):
    """The request queue is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class ContextOverflow(GenerationError):
    """Prompt plus ``max_tokens`` does not fit the model's context window."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_window: int):
        super().__init__(
            f"This model's maximum context length is {context_window} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            f"completion). Please reduce the length of the messages or completion."
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_window = context_window


class UnknownAdapter(GenerationError):
    def __init__(self, name: str, known: tuple[str, ...]):
        super().__init__(f"unknown adapter {name!r}; served adapters: {', '.join(known) or 'none'}")
        self.name = name


class Generator(Protocol):
    """What a generation backend offers."""

    model_id: str
    """The base model's id as listed by ``/v1/models``."""

    context_window: int
    """Tokens the model can attend to: prompt plus completion."""

    adapters: tuple[str, ...]
    """Names of the adapters that can be chosen per request."""

    def count_prompt_tokens(self, messages: list[Message]) -> int:
        """Tokens of ``messages`` rendered with the chat template, generation prompt included."""

    def count_text_tokens(self, text: str) -> int:
        """Tokens of a bare piece of text (for packing passages under a budget)."""

    def stream(
        self, messages: list[Message], params: SamplingParams, adapter: str | None = None
    ) -> AsyncIterator[GenerationEvent]:
        """Generate a reply to ``messages``; raises GenerationError subclasses before the first event."""

    async def aclose(self) -> None:
        """Stop the backend's workers and release the model."""
