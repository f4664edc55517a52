"""``GET /v1/models``: the base generator, its adapters (with ``parent``), for
frontends that can only pick a model one ``MODEL@KB`` id per knowledge base, and
the embedding model (the id ``/v1/embeddings`` wants)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from api.auth import access_of, require_key
from api.errors import error_responses
from api.protocol import ModelCard, ModelList
from api.state import ServerState, require_ready

router = APIRouter(dependencies=[Depends(require_key), Depends(require_ready)], responses=error_responses(401, 503))


@router.get("/v1/models")
def list_models(request: Request) -> ModelList:
    state: ServerState = request.app.state.zhiku
    base = state.generator.model_id
    created = state.started
    cards = [ModelCard(id=base, created=created, root=base)]
    cards += [ModelCard(id=name, created=created, parent=base, root=base) for name in state.generator.adapters]
    for kb in state.visible_kbs(access_of(request)):
        cards += [
            ModelCard(id=f"{model}@{kb}", created=created, parent=model, root=base, knowledge_base=kb)
            for model in state.model_ids()
        ]
    cards.append(ModelCard(id=state.embedder.model_id, created=created, root=state.embedder.model_id, kind="embedding"))
    return ModelList(data=cards)
