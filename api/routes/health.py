"""``GET /health`` (the process is alive) and ``GET /ready`` (models are loaded)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.protocol import GeneratorLoad, Health, Readiness

router = APIRouter()


@router.get("/health")
def health() -> Health:
    return Health()


@router.get("/ready", responses={503: {"model": Readiness, "description": "The models are loading or failed to load"}})
def ready(request: Request) -> Readiness:
    state = getattr(request.app.state, "zhiku", None)
    if state is None:
        failure = getattr(request.app.state, "load_error", None)
        body = Readiness(status="failed", error=failure) if failure else Readiness(status="loading")
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
    body = Readiness(status="ready", model=state.generator.model_id, embedding_model=state.embedder.model_id)
    stats = getattr(state.generator, "stats", None)  # the local generator's load; an upstream has its own
    if stats is not None:
        snapshot = stats()
        body.generator = GeneratorLoad(queue_depth=snapshot.queue_depth, running=snapshot.running)
    return body
