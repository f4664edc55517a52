"""``GET /health`` (the process is alive) and ``GET /ready`` (models are loaded)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "The models are loading or failed to load"}})
def ready(request: Request) -> JSONResponse:
    state = getattr(request.app.state, "zhiku", None)
    if state is None:
        failure = getattr(request.app.state, "load_error", None)
        body = {"status": "failed", "error": failure} if failure else {"status": "loading"}
        return JSONResponse(body, status_code=503)
    body = {"status": "ready", "model": state.generator.model_id, "embedding_model": state.embedder.model_id}
    stats = getattr(state.generator, "stats", None)  # the local generator's load; an upstream has its own
    if stats is not None:
        snapshot = stats()
        body["generator"] = {"queue_depth": snapshot.queue_depth, "running": snapshot.running}
    return JSONResponse(body)
