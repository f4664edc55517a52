"""``POST /v1/embeddings`` with the server's embedder (the one its knowledge bases pin)."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
from fastapi import APIRouter, Depends, Request

from api.auth import require_key
from api.errors import APIError, error_responses
from api.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse
from api.state import ServerState, require_ready

router = APIRouter(dependencies=[Depends(require_key), Depends(require_ready)], responses=error_responses(400, 401, 404, 413, 503))
MAX_INPUTS = 2048


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    state: ServerState = request.app.state.zhiku
    embedder = state.embedder
    if body.model not in (embedder.model_id, embedder.path.name):
        raise APIError(404, f"The model '{body.model}' is not an embedding model here; use '{embedder.model_id}'", param="model", code="model_not_found")
    texts = body.texts()
    if not texts or len(texts) > MAX_INPUTS or any(not t for t in texts):
        raise APIError(400, f"input: give 1 to {MAX_INPUTS} non-empty strings", param="input")
    if body.dimensions is not None and body.dimensions != embedder.dimension:
        raise APIError(400, f"dimensions: this model only produces {embedder.dimension}", param="dimensions")
    queries = body.input_type == "query"
    vectors = await asyncio.to_thread(embedder.embed_queries if queries else embedder.embed_passages, texts)
    tokens = await asyncio.to_thread(embedder.count_tokens, texts, queries=queries)
    return EmbeddingResponse(
        data=[EmbeddingData(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)],
        model=body.model,
        usage={"prompt_tokens": tokens, "total_tokens": tokens},
    )


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.astype(float).tolist()
