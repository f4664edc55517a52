"""The FastAPI application: ``create_app(settings)``.

Start-up returns at once and loads the models in the background, so ``/health``
answers while ``/ready`` (and every model route) says 503 until they are loaded.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from api.disconnect import CancelOnDisconnect
from api.errors import install_error_handlers, without_validation_422
from api.limits import BodySizeLimit
from api.routes import chat, embeddings, health, jobs, knowledge_bases, models, page
from api.state import ServerState, build_state
from settings import Settings

log = logging.getLogger("zhiku.api")


def create_app(settings: Settings, *, default_kb: str | None = None, state: ServerState | None = None) -> FastAPI:
    """The zhiku HTTP server. ``state`` (already loaded models) skips loading, for tests and embedding."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None if state else asyncio.create_task(_load(app, settings, default_kb))
        yield
        if loader is not None:
            loader.cancel()
        loaded = getattr(app.state, "zhiku", None)
        if loaded is not None and state is None:
            await asyncio.to_thread(loaded.jobs.close)
            await loaded.generator.aclose()

    app = FastAPI(
        title="zhiku 知库",
        description="Retrieval-augmented chat over local knowledge bases, OpenAI-compatible.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.zhiku = state
    app.add_middleware(CancelOnDisconnect)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_origin_regex=settings.cors_origin_regex,
        allow_methods=["*"],
        allow_headers=["*"],
        allow_credentials=False,
    )
    app.add_middleware(BodySizeLimit, default_limit=settings.max_request_bytes, upload_limit=settings.max_upload_bytes)
    install_error_handlers(app)
    without_validation_422(app)
    for module in (health, models, chat, embeddings, knowledge_bases, jobs, page):
        app.include_router(module.router)
    app.include_router(page.caller_router)
    return app


async def _load(app: FastAPI, settings: Settings, default_kb: str | None) -> None:
    try:
        app.state.zhiku = await asyncio.to_thread(build_state, settings, default_kb)
        log.info("zhiku is ready: model %s", app.state.zhiku.generator.model_id)
    except Exception as exc:  # reported by /ready and every model route
        log.exception("loading the models failed")
        app.state.load_error = str(exc)
