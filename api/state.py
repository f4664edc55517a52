"""What one running server holds: settings, knowledge bases, models, services.
Built once at start-up and kept on ``app.state.zhiku`` (no module globals)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from memory.embedding import Embedder, load_embedder
from memory.knowledge_base import KnowledgeBaseError, KnowledgeBases, KnowledgeBaseUnavailable, validate_name
from rag.chat import ChatService
from rag.generation import Generator
from rag.retrieval import Retriever
from memory.service import KnowledgeBaseService
from settings import Settings

from fastapi import Request

from api.auth import OPEN, Access
from api.errors import APIError, unavailable
from api.shown_paths import ShownPaths
from api.jobs import Jobs
from api.uploads import clean_leftovers

log = logging.getLogger("zhiku.api")


@dataclass
class ServerState:
    settings: Settings
    knowledge_bases: KnowledgeBases
    embedder: Embedder
    generator: Generator
    retriever: Retriever
    chat: ChatService
    default_kb: str | None = None
    started: int = field(default_factory=lambda: int(time.time()))
    shown_paths: ShownPaths | None = None  # built from settings and knowledge_bases when not given
    kb_service: KnowledgeBaseService | None = None  # likewise
    jobs: Jobs | None = None  # likewise; its records and files are under settings.home

    def __post_init__(self) -> None:
        if self.shown_paths is None:
            self.shown_paths = ShownPaths(self.settings.home, self.knowledge_bases)
        if self.kb_service is None:
            self.kb_service = KnowledgeBaseService(self.knowledge_bases, self.settings)
        if self.jobs is None:
            self.jobs = Jobs(self.settings.home, self.kb_service, self.embedder)
            self.jobs.recover()  # before the clean-up: an interrupted job's files are kept for its retry
            clean_leftovers(self.settings.home, self.knowledge_bases)

    @classmethod
    def assemble(
        cls, settings: Settings, knowledge_bases: KnowledgeBases, embedder: Embedder, generator: Generator, default_kb: str | None = None
    ) -> "ServerState":
        """The state around loaded models: the retriever and the chat service built on them."""
        retriever = Retriever.from_settings(settings, knowledge_bases, embedder)
        return cls(
            settings=settings,
            knowledge_bases=knowledge_bases,
            embedder=embedder,
            generator=generator,
            retriever=retriever,
            chat=ChatService(generator, retriever, settings),
            default_kb=default_kb,
        )

    def model_ids(self) -> list[str]:
        return [self.generator.model_id, *self.generator.adapters]

    def resolve_model(self, requested: str, access: Access = OPEN) -> tuple[str | None, str | None]:
        """``MODEL`` or ``MODEL@KB`` -> (adapter or None for the base, knowledge base or None)."""
        model, at, kb = requested.rpartition("@") if "@" in requested else (requested, "", "")
        if model == self.generator.model_id:
            adapter = None
        elif model in self.generator.adapters:
            adapter = model
        else:
            known = ", ".join(self.model_ids())
            raise APIError(404, f"The model '{requested}' does not exist; served models: {known}", param="model", code="model_not_found")
        if at:
            self.require_searchable_kb(kb, param="model", access=access)
        return adapter, (kb or None)

    def visible_kbs(self, access: Access = OPEN) -> list[str]:
        return [name for name in self.knowledge_bases.names() if access.can_read(name)]

    def require_kb(self, name: str, *, param: str = "knowledge_base", access: Access = OPEN) -> str:
        """``name`` if it exists and ``access`` may see it; else a 404 that, with keys on, lists nothing."""
        try:
            if self.knowledge_bases.exists(name) and access.can_read(name):
                return name
        except KnowledgeBaseUnavailable as exc:
            raise unavailable(exc) from None
        except KnowledgeBaseError as exc:
            raise APIError(400, str(exc), param=param, code="invalid_knowledge_base") from None
        message = f"knowledge base '{name}' does not exist"
        if not access.keys_configured:
            message += f" (known: {', '.join(self.visible_kbs()) or 'none yet'})"
        raise APIError(404, message, param=param, code="knowledge_base_not_found")

    def require_searchable_kb(self, name: str, *, param: str = "knowledge_base", access: Access = OPEN) -> str:
        """An existing knowledge base whose vectors come from this server's embedding model."""
        self.require_kb(name, param=param, access=access)
        pinned = self.knowledge_bases.manifest(name).embedding_model
        if pinned != self.embedder.model_id:
            raise APIError(
                400,
                f"knowledge base '{name}' was built with embedding model '{pinned}' but this server embeds with "
                f"'{self.embedder.model_id}'; serve it with ZHIKU_EMBEDDING_MODEL={pinned}, or re-embed it with "
                f"`ingest rebuild --kb {name} --embedding-model {self.embedder.model_id}`",
                param=param,
                code="embedding_model_mismatch",
            )
        return name


def load_generator(settings: Settings) -> Generator:
    """The upstream backend when ``upstream_base_url`` is set, else the local model."""
    if settings.upstream_base_url:
        from rag.upstream_generator import UpstreamGenerator

        return UpstreamGenerator.from_settings(settings)
    from rag.local_generator import LocalGenerator

    return LocalGenerator.from_settings(settings)


def build_state(settings: Settings, default_kb: str | None = None) -> ServerState:
    """Load every model (blocking; call from a worker thread)."""
    if default_kb is not None:
        validate_name(default_kb)
    knowledge_bases = KnowledgeBases.from_settings(settings)
    embedder = load_embedder(settings)
    embedder.embed_queries(["warm-up"])  # load now, not on the first request
    generator = load_generator(settings)
    if default_kb and not knowledge_bases.exists(default_kb):
        log.warning("knowledge base %r does not exist yet: requests that name none get no retrieval until it is created", default_kb)
    return ServerState.assemble(settings, knowledge_bases, embedder, generator, default_kb)


def require_ready(request: Request) -> None:
    """Routes that need the models answer 503 until start-up has loaded them."""
    if getattr(request.app.state, "zhiku", None) is None:
        failure = getattr(request.app.state, "load_error", None)
        message = f"the server failed to load its models: {failure}" if failure else "the server is loading its models"
        raise APIError(503, message, code="not_ready", headers={"Retry-After": "5"})
