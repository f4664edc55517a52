"""Knowledge bases over HTTP: list, create, delete, list/upload/delete documents, search.

Uploads run the same pipeline as ``ingest add`` (a broken file is reported, the
rest are ingested). Uploaded files are kept under ``<ZHIKU_HOME>/uploads/<kb>/``
so an unchanged re-upload is recognised by its hash like any ingest.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import unicodedata
from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, Depends, File, Request, UploadFile

from api.auth import require_admin, require_key
from api.errors import APIError
from api.protocol import KnowledgeBaseCreate, KnowledgeBaseSearch
from api.state import ServerState, require_ready
from memory.ingestion import add_paths, manifest_for, remove_paths
from memory.knowledge_base import KnowledgeBaseBusy, KnowledgeBaseError, KnowledgeBaseNotFound, validate_name

router = APIRouter(prefix="/v1/knowledge_bases", dependencies=[Depends(require_key), Depends(require_ready)])
admin = [Depends(require_admin)]


def _state(request: Request) -> ServerState:
    return request.app.state.zhiku


def _kb_error(exc: KnowledgeBaseError) -> APIError:
    if isinstance(exc, KnowledgeBaseNotFound):
        return APIError(404, str(exc), param="kb", code="knowledge_base_not_found")
    if isinstance(exc, KnowledgeBaseBusy):
        return APIError(409, str(exc), param="kb", code="knowledge_base_busy", headers={"Retry-After": "5"})
    return APIError(400, str(exc), param="kb", code="invalid_knowledge_base")


async def _run(function, *args, **kwargs):
    """Knowledge-base work off the event loop, with its errors as HTTP errors."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except KnowledgeBaseError as exc:
        raise _kb_error(exc) from None


@router.get("")
async def list_knowledge_bases(request: Request) -> dict:
    kbs = _state(request).knowledge_bases

    def describe(name: str) -> dict:
        documents = kbs.documents(name)
        return {
            **asdict(kbs.manifest(name)),
            "documents": len(documents),
            "chunks": sum(d.chunk_count for d in documents),
        }

    return {"object": "list", "data": await _run(lambda: [describe(n) for n in kbs.names()])}


@router.post("", dependencies=admin, status_code=201)
async def create_knowledge_base(body: KnowledgeBaseCreate, request: Request) -> dict:
    state = _state(request)
    settings = state.settings
    manifest = manifest_for(body.name, state.embedder, settings.chunk_size, settings.chunk_overlap)

    def create() -> None:
        validate_name(body.name)
        if state.knowledge_bases.exists(body.name):
            raise APIError(409, f"knowledge base '{body.name}' already exists", param="name", code="knowledge_base_exists")
        with state.knowledge_bases.writer(body.name, create=manifest):
            pass

    await _run(create)
    return asdict(manifest)


@router.delete("/{kb}", dependencies=admin)
async def delete_knowledge_base(kb: str, request: Request) -> dict:
    state = _state(request)
    await _run(state.knowledge_bases.drop, kb)
    shutil.rmtree(_upload_dir(state, kb), ignore_errors=True)
    return {"id": kb, "object": "knowledge_base", "deleted": True}


@router.get("/{kb}/documents")
async def list_documents(kb: str, request: Request) -> dict:
    documents = await _run(_state(request).knowledge_bases.documents, kb)
    return {"object": "list", "data": [asdict(d) for d in documents]}


@router.post("/{kb}/documents", dependencies=admin)
async def upload_documents(kb: str, request: Request, files: list[UploadFile] = File(...)) -> dict:
    state = _state(request)
    validate_kb_name(kb)
    chunk_size, chunk_overlap = state.settings.chunk_size, state.settings.chunk_overlap
    if state.knowledge_bases.exists(kb):  # an existing knowledge base keeps its own chunking
        state.require_searchable_kb(kb, param="kb")
        manifest = state.knowledge_bases.manifest(kb)
        chunk_size, chunk_overlap = manifest.chunk_size, manifest.chunk_overlap
    folder = _upload_dir(state, kb)
    saved = [await _save_upload(upload, folder) for upload in files]
    report = await _run(
        add_paths, state.knowledge_bases, kb, saved, state.embedder, chunk_size=chunk_size, chunk_overlap=chunk_overlap
    )
    return {"object": "list", "data": [asdict(o) for o in report.outcomes], "failed": len(report.failed)}


@router.delete("/{kb}/documents/{document_id}", dependencies=admin)
async def delete_document(kb: str, document_id: int, request: Request) -> dict:
    state = _state(request)
    documents = await _run(state.knowledge_bases.documents, kb)
    match = next((d for d in documents if d.id == document_id), None)
    if match is None:
        raise APIError(404, f"knowledge base '{kb}' has no document {document_id}", param="document_id", code="document_not_found")
    await _run(remove_paths, state.knowledge_bases, kb, [Path(match.path)])
    if Path(match.path).parent == _upload_dir(state, kb):
        Path(match.path).unlink(missing_ok=True)
    return {"id": document_id, "object": "document", "deleted": True, "path": match.path}


@router.post("/{kb}/search")
async def search(kb: str, body: KnowledgeBaseSearch, request: Request) -> dict:
    state = _state(request)
    state.require_searchable_kb(kb, param="kb")
    threshold = state.settings.score_threshold if body.score_threshold is None else body.score_threshold
    passages = await _run(state.retriever.retrieve, kb, body.query, top_k=body.top_k, score_threshold=threshold)
    return {
        "object": "list",
        "data": [
            {"index": i, "source": p.source, "page": p.pages[0] if p.pages else None, "pages": list(p.pages), "score": p.score, "text": p.text}
            for i, p in enumerate(passages, 1)
        ],
    }


def validate_kb_name(name: str) -> None:
    try:
        validate_name(name)
    except KnowledgeBaseError as exc:
        raise _kb_error(exc) from None


def _upload_dir(state: ServerState, kb: str) -> Path:
    return state.settings.home / "uploads" / validate_name(kb)


_UNSAFE = re.compile(r"[^\w.\-() \u3000-\u9fff]+")


def sanitised_filename(name: str | None) -> str:
    """A file name safe to create: no folders, no control characters, no leading dots."""
    base = unicodedata.normalize("NFC", Path((name or "").replace("\\", "/")).name)
    cleaned = _UNSAFE.sub("_", base).strip(" .")
    return cleaned[:200] or "upload"


async def _save_upload(upload: UploadFile, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / sanitised_filename(upload.filename)
    partial = target.with_name(target.name + ".part")
    with partial.open("wb") as out:
        while chunk := await upload.read(1 << 20):
            out.write(chunk)
    partial.replace(target)
    return target
