"""``POST /v1/chat/completions``: OpenAI chat completions over retrieved passages.

Streaming sends, in order: a first chunk per choice with ``delta.role`` and the
top-level ``sources`` field (zhiku extension; only on the very first chunk),
content chunks, one chunk per choice with its ``finish_reason``, then — when
``stream_options.include_usage`` — a chunk with ``choices: []`` and ``usage``,
then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from api.auth import Access, access_of, require_key
from api.errors import APIError, error_responses
from api.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    SourcePassage,
    Usage,
    completion_id,
)
from api.state import ServerState, require_ready
from rag.chat import ChatTurn, PreparedChat, choice_params, collect
from rag.generation import (
    ContextOverflow,
    Finished,
    GenerationError,
    GenerationEvent,
    GeneratorOverloaded,
    SamplingParams,
    TextDelta,
    UnknownAdapter,
)

router = APIRouter(dependencies=[Depends(require_key), Depends(require_ready)], responses=error_responses(400, 401, 404, 413, 429, 503))


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletionResponse, "content": {"text/event-stream": {"schema": {"type": "string"}}},
                     "description": "A chat completion, or with `stream: true` Server-Sent Events of chunks"}},
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state: ServerState = request.app.state.zhiku
    turn = _chat_turn(body, state, access_of(request))
    prepared = await _prepare(state, turn)
    streams = [state.chat.stream(prepared, p, turn.adapter) for p in choice_params(turn.params, body.n)]
    firsts = await _first_events(streams)
    sources = _sources(prepared, state)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _sse(body.model, sources, streams, firsts, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    results = await asyncio.gather(*(collect(_prepend(first, s)) for first, s in zip(firsts, streams)))
    return _completion(body.model, sources, results)


def _chat_turn(body: ChatCompletionRequest, state: ServerState, access: Access) -> ChatTurn:
    settings = state.settings
    if len(body.messages) > settings.max_messages:
        raise APIError(400, f"messages: at most {settings.max_messages} messages are accepted", param="messages")
    messages = [m.as_message() for m in body.messages]
    if messages[-1]["role"] != "user":
        raise APIError(400, "messages: the last message must have role 'user'", param="messages")
    max_tokens = body.requested_max_tokens() or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{param}: at most {settings.max_tokens_limit} tokens may be requested", param=param)
    adapter, kb_from_model = state.resolve_model(body.model, access)
    return ChatTurn(
        messages=messages,
        params=SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop_sequences(),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
        ),
        adapter=adapter,
        knowledge_base=_knowledge_base(body, kb_from_model, state, access),
        top_k=body.top_k,
        score_threshold=body.score_threshold,
    )


def _knowledge_base(body: ChatCompletionRequest, kb_from_model: str | None, state: ServerState, access: Access) -> str | None:
    """The request's field wins (null: no retrieval), then ``MODEL@KB``, then the server's ``--kb``
    (when the key may read it: a scoped key outside it gets no retrieval)."""
    if "knowledge_base" in body.model_fields_set:
        return state.require_searchable_kb(body.knowledge_base, access=access) if body.knowledge_base is not None else None
    if kb_from_model:
        return kb_from_model
    default = state.default_kb
    if default and access.can_read(default) and state.knowledge_bases.exists(default):
        return state.require_searchable_kb(default)
    return None


async def _prepare(state: ServerState, turn: ChatTurn) -> PreparedChat:
    try:
        return await state.chat.prepare(turn)
    except ContextOverflow as exc:
        raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None


async def _first_events(streams: list[AsyncIterator[GenerationEvent]]) -> list[GenerationEvent]:
    """Start every choice, so queue and context errors become HTTP errors before any byte is sent."""
    try:
        return list(await asyncio.gather(*(anext(s) for s in streams)))
    except GenerationError as exc:
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        raise _as_api_error(exc) from None


def _as_api_error(exc: GenerationError) -> APIError:
    if isinstance(exc, GeneratorOverloaded):
        retry = str(max(1, round(exc.retry_after)))
        return APIError(429, f"the server is busy: {exc}", code="overloaded", headers={"Retry-After": retry})
    if isinstance(exc, ContextOverflow):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, UnknownAdapter):
        return APIError(404, str(exc), param="model", code="model_not_found")
    return APIError(503, f"generation failed: {exc}", code="generation_failed")


async def _prepend(first: GenerationEvent, rest: AsyncIterator[GenerationEvent]) -> AsyncIterator[GenerationEvent]:
    try:
        yield first
        if not isinstance(first, Finished):
            async for event in rest:
                yield event
    finally:
        await rest.aclose()


def _sources(prepared: PreparedChat, state: ServerState) -> list[SourcePassage]:
    if not prepared.passages:
        return []
    shown = state.shown_paths.for_kb(prepared.knowledge_base)
    return [SourcePassage.of(i, p, shown) for i, p in enumerate(prepared.passages, 1)]


def _usage(finishes: list[Finished]) -> Usage:
    prompt = finishes[0].prompt_tokens  # one prompt, however many choices
    completion = sum(f.completion_tokens for f in finishes)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _completion(model: str, sources: list[SourcePassage], results: list[tuple[str, Finished]]) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        model=model,
        choices=[
            Choice(index=i, message=AssistantMessage(content=text), finish_reason=finished.finish_reason)
            for i, (text, finished) in enumerate(results)
        ],
        usage=_usage([finished for _, finished in results]),
        sources=sources,
    )


class _ChunkWriter:
    """Serialises ``chat.completion.chunk`` events sharing one id and timestamp."""

    def __init__(self, model: str, include_usage: bool):
        self.base = {"id": completion_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        self.include_usage = include_usage

    def choice(self, index: int, delta: dict, finish_reason: str | None = None, **extra) -> str:
        chunk = {**self.base, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None
        return _sse_line({**chunk, **extra})

    def usage(self, usage: Usage) -> str:
        return _sse_line({**self.base, "choices": [], "usage": usage.model_dump()})


def _sse_line(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(
    model: str,
    sources: list[SourcePassage],
    streams: list[AsyncIterator[GenerationEvent]],
    firsts: list[GenerationEvent],
    include_usage: bool,
) -> AsyncIterator[str]:
    writer = _ChunkWriter(model, include_usage)
    for index in range(len(streams)):
        extra = {"sources": [s.model_dump() for s in sources]} if index == 0 else {}
        yield writer.choice(index, {"role": "assistant", "content": ""}, **extra)
    finishes: list[Finished] = []
    try:
        async for index, event in _merged(streams, firsts):
            if isinstance(event, TextDelta):
                if event.text:
                    yield writer.choice(index, {"content": event.text})
            else:
                finishes.append(event)
                yield writer.choice(index, {}, event.finish_reason)
    except GenerationError as exc:  # headers are sent: report in-band, as OpenAI streams do
        yield _sse_line({"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None, "code": "generation_failed"}})
        return
    if include_usage and finishes:
        yield writer.usage(_usage(finishes))
    yield "data: [DONE]\n\n"


async def _merged(
    streams: list[AsyncIterator[GenerationEvent]], firsts: list[GenerationEvent]
) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Events of all choices as they come, tagged with the choice index.

    When the consumer stops (client gone), every choice's generation is cancelled."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for event in _prepend(firsts[index], streams[index]):
                await queue.put((index, event))
        except Exception as exc:  # surfaced to the consumer below
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
