"""The chat service: retrieve, assemble the prompt, generate. No HTTP here —
``api/`` translates requests into :class:`ChatTurn` and results into OpenAI bodies.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from rag.citations import CitationAdder
from rag.generation import Finished, GenerationEvent, Generator, Message, SamplingParams, TextDelta
from rag.prompt import Templates, assemble, language_of, no_context_notice, retrieval_query, split_conversation
from settings import Settings


@dataclass(frozen=True)
class ChatTurn:
    """One chat request, as the service sees it."""

    messages: list[Message]
    params: SamplingParams
    adapter: str | None = None
    knowledge_base: str | None = None
    top_k: int | None = None
    score_threshold: float | None = None


@dataclass(frozen=True)
class PreparedChat:
    """What goes to the generator, and what the response reports about it."""

    messages: list[Message]
    passages: list = field(default_factory=list)  # the passages sent, [1] first
    notice: str = ""  # text to put before the answer (no relevant passage found)
    knowledge_base: str | None = None


def templates_from(settings: Settings) -> Templates:
    defaults = Templates()
    return Templates(zh=settings.prompt_template_zh or defaults.zh, en=settings.prompt_template_en or defaults.en)


class ChatService:
    """Retrieval-augmented chat over one generator.

    ``retriever`` may be None (a server with no knowledge bases); retrieval then
    is refused for requests that name a knowledge base.
    """

    def __init__(self, generator: Generator, retriever, settings: Settings):
        self.generator = generator
        self.retriever = retriever
        self.settings = settings
        self.templates = templates_from(settings)
        # One thread for all retrieval: the embedder and FAISS are not safe to drive from many
        # threads at once, and one warm thread keeps one OpenMP team instead of one per thread.
        self._retrieval_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zhiku-retrieval")

    async def prepare(self, turn: ChatTurn) -> PreparedChat:
        """Retrieve for ``turn`` and fit everything in the context window (ContextOverflow if impossible)."""
        # embedding, search and tokenising are CPU work: keep them off the event loop
        return await asyncio.get_running_loop().run_in_executor(self._retrieval_thread, self.prepare_now, turn)

    def prepare_now(self, turn: ChatTurn) -> PreparedChat:
        """:meth:`prepare`, blocking (for batch jobs such as ``finetune build-rag-data``)."""
        passages = self._retrieve(turn) if turn.knowledge_base else []
        assembled = assemble(
            turn.messages,
            passages,
            count_tokens=self.generator.count_prompt_tokens,
            context_window=self.generator.context_window,
            max_tokens=turn.params.max_tokens,
            templates=self.templates,
            passage_tokens=self.settings.passage_tokens,
        )
        notice = ""
        if turn.knowledge_base and not assembled.passages and self.settings.no_context_notice:
            notice = no_context_notice(language_of(turn.messages[-1]["content"]))
        return PreparedChat(assembled.messages, assembled.passages, notice, turn.knowledge_base)

    def _retrieve(self, turn: ChatTurn) -> list:
        _, history, question = split_conversation(turn.messages)
        query = retrieval_query(history, question["content"])
        return self.retriever.retrieve(
            turn.knowledge_base,
            query,
            top_k=turn.top_k or self.settings.top_k,
            score_threshold=self.settings.score_threshold if turn.score_threshold is None else turn.score_threshold,
        )

    def stream(self, prepared: PreparedChat, params: SamplingParams, adapter: str | None) -> AsyncIterator[GenerationEvent]:
        """The generator's events, preceded by the notice when there is one, with citations added."""
        events = self.generator.stream(prepared.messages, params, adapter)
        if self.settings.add_citations and prepared.passages:
            question = prepared.messages[-1]["content"]
            events = _with_citations(events, CitationAdder([p.text for p in prepared.passages], question))
        return _with_notice(events, prepared.notice)


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """Parameters for ``n`` choices: distinct seeds so seeded choices differ but stay reproducible."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [replace(params, seed=params.seed + i) for i in range(n)]


async def _with_citations(events: AsyncIterator[GenerationEvent], adder: CitationAdder) -> AsyncIterator[GenerationEvent]:
    try:
        async for event in events:
            text = adder.feed(event.text) if isinstance(event, TextDelta) else adder.finish()
            if text:
                yield TextDelta(text)
            if not isinstance(event, TextDelta):
                yield event
    finally:
        await events.aclose()


async def _with_notice(events: AsyncIterator[GenerationEvent], notice: str) -> AsyncIterator[GenerationEvent]:
    try:
        first = await anext(events)  # generator errors surface before the notice is sent
        if notice:
            yield TextDelta(notice)
        yield first
        async for event in events:
            yield event
    finally:
        await events.aclose()


async def collect(events: AsyncIterator[GenerationEvent]) -> tuple[str, Finished]:
    """Join a generation's text; returns (text, Finished)."""
    parts: list[str] = []
    async for event in events:
        if isinstance(event, Finished):
            return "".join(parts), event
        parts.append(event.text)
    raise RuntimeError("generation ended without a Finished event")
