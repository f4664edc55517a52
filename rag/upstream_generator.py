"""Generation proxied to any OpenAI-compatible server (vLLM, another zhiku, …).

Retrieval and prompt assembly stay here; the upstream only generates. Token
counts for packing are estimated (the upstream's tokenizer is not available
locally); the usage reported to clients is the upstream's own exact count.
"""

from __future__ import annotations

import re
from typing import AsyncIterator

import openai

from rag.generation import (
    Finished,
    GenerationError,
    GenerationEvent,
    GeneratorOverloaded,
    Message,
    SamplingParams,
    TextDelta,
    UnknownAdapter,
)
from settings import Settings

# An over-estimate on purpose (packing must not overflow the upstream's window):
# one token per CJK character, ~one per short word or punctuation mark elsewhere.
_TOKEN_PIECES = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[A-Za-z]{1,4}|\d{1,3}|[^\sA-Za-z\d]")
_PER_MESSAGE_OVERHEAD = 8


class UpstreamGenerator:
    """The generator protocol over an OpenAI-compatible ``/v1`` endpoint."""

    def __init__(self, base_url: str, *, api_key: str | None, model: str, adapters: tuple[str, ...], context_window: int, max_in_flight: int):
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "not-needed", max_retries=0)
        self.model_id = model
        self.adapters = adapters
        self.context_window = context_window
        self._max_in_flight = max_in_flight
        self._in_flight = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> "UpstreamGenerator":
        """Discover the upstream's models once: the base, and adapters whose ``parent`` is the base."""
        sync = openai.OpenAI(base_url=settings.upstream_base_url, api_key=settings.upstream_api_key or "not-needed", max_retries=2)
        try:
            cards = [m.model_dump() for m in sync.models.list().data]
        except openai.OpenAIError as exc:
            raise GenerationError(f"upstream {settings.upstream_base_url} did not list its models: {exc}") from None
        base = settings.upstream_model or next((c["id"] for c in cards if not c.get("parent")), None)
        if base is None:
            raise GenerationError(f"upstream {settings.upstream_base_url} serves no model")
        base_card = next((c for c in cards if c["id"] == base), {})
        adapters = tuple(c["id"] for c in cards if c.get("parent") == base and "@" not in c["id"])
        return cls(
            settings.upstream_base_url,
            api_key=settings.upstream_api_key,
            model=base,
            adapters=adapters,
            context_window=int(base_card.get("max_model_len") or settings.upstream_context_window),
            max_in_flight=settings.generator_queue_size,
        )

    def count_text_tokens(self, text: str) -> int:
        return len(_TOKEN_PIECES.findall(text))

    def count_prompt_tokens(self, messages: list[Message]) -> int:
        return sum(self.count_text_tokens(m["content"]) + _PER_MESSAGE_OVERHEAD for m in messages)

    async def stream(self, messages: list[Message], params: SamplingParams, adapter: str | None = None) -> AsyncIterator[GenerationEvent]:
        if adapter is not None and adapter not in self.adapters:
            raise UnknownAdapter(adapter, self.adapters)
        if self._in_flight >= self._max_in_flight:
            raise GeneratorOverloaded(f"{self._in_flight} requests are already waiting upstream", retry_after=1.0)
        self._in_flight += 1
        try:
            async for event in self._proxy(messages, params, adapter or self.model_id):
                yield event
        finally:
            self._in_flight -= 1

    async def _proxy(self, messages: list[Message], params: SamplingParams, model: str) -> AsyncIterator[GenerationEvent]:
        try:
            response = await self.client.chat.completions.create(**_request(messages, params, model))
        except openai.RateLimitError as exc:
            raise GeneratorOverloaded(f"upstream is busy: {exc.message}") from None
        except openai.OpenAIError as exc:
            raise GenerationError(f"upstream refused the request: {exc}") from None
        finish_reason, usage, text = "stop", None, []
        try:
            async for chunk in response:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        text.append(choice.delta.content)
                        yield TextDelta(choice.delta.content)
                    finish_reason = choice.finish_reason or finish_reason
        finally:
            await response.close()
        # an upstream that reports no usage gets our estimate rather than zeros
        yield Finished(
            "length" if finish_reason == "length" else "stop",
            usage.prompt_tokens if usage else self.count_prompt_tokens(messages),
            usage.completion_tokens if usage else self.count_text_tokens("".join(text)),
        )

    async def aclose(self) -> None:
        await self.client.close()


def _request(messages: list[Message], params: SamplingParams, model: str) -> dict:
    request = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        # ask the upstream not to retrieve again (a zhiku upstream would; others ignore it)
        "extra_body": {"knowledge_base": None},
    }
    if params.seed is not None:
        request["seed"] = params.seed
    if params.stop:
        request["stop"] = list(params.stop)
    return request
