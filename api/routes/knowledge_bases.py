"""Knowledge bases over HTTP: list, create, delete, list/upload/delete documents, search.

An upload streams its files to disk and returns at once (202) with an ingestion job
(``api.jobs``; watch it under ``/jobs``); ``?wait=true`` ingests before answering, for
scripts. Either way it runs the same pipeline as ``ingest add`` (a broken file is
reported, the rest are ingested). Uploaded files are kept under
``<ZHIKU_HOME>/uploads/<kb>/`` (see ``api.uploads``) so an unchanged re-upload is
recognised by its hash like any ingest.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile
from fastapi import Path as PathParam

from api.auth import access_of, require_admin, require_key, require_write
from api.errors import APIError, error_responses, unavailable
from api.protocol import (
    Deleted,
    DocumentInfo,
    DocumentList,
    FileOutcomeInfo,
    IngestJob,
    KnowledgeBaseCreate,
    KnowledgeBaseList,
    KnowledgeBaseSearch,
    KnowledgeBaseSummary,
    SearchResponse,
    SourcePassage,
    UploadReport,
)
from api.state import ServerState, require_ready
from api.routes.jobs import job_view, shown_paths_for
from api.uploads import stage, staging_area, upload_dir
from memory.knowledge_base import (
    KB_NAME_RULE,
    KnowledgeBaseBusy,
    KnowledgeBaseError,
    KnowledgeBaseNotFound,
    KnowledgeBaseUnavailable,
    validate_name,
)
from memory.service import KnowledgeBaseExists

router = APIRouter(
    prefix="/v1/knowledge_bases",
    dependencies=[Depends(require_key), Depends(require_ready)],
    responses=error_responses(400, 401, 403, 404, 409, 413, 503),
)
admin = [Depends(require_admin)]
KnowledgeBaseName = Annotated[str, PathParam(description=KB_NAME_RULE)]


def _state(request: Request) -> ServerState:
    return request.app.state.zhiku


def _kb_error(exc: KnowledgeBaseError) -> APIError:
    if isinstance(exc, KnowledgeBaseUnavailable):
        return unavailable(exc)
    if isinstance(exc, KnowledgeBaseNotFound):
        return APIError(404, str(exc), param="kb", code="knowledge_base_not_found")
    if isinstance(exc, KnowledgeBaseExists):  # only creating one raises it
        return APIError(409, str(exc), param="name", code="knowledge_base_exists")
    if isinstance(exc, KnowledgeBaseBusy):
        return APIError(409, str(exc), param="kb", code="knowledge_base_busy", headers={"Retry-After": "5"})
    return APIError(400, str(exc), param="kb", code="invalid_knowledge_base")


async def _run(function, *args, **kwargs):
    """Knowledge-base work off the event loop, with its errors as HTTP errors."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except KnowledgeBaseError as exc:
        raise _kb_error(exc) from None


def _readable(request: Request, kb: str) -> str:
    """``kb`` if it exists and the caller's key may see it (else 404)."""
    return _state(request).require_kb(kb, param="kb", access=access_of(request))


@router.get("")
async def list_knowledge_bases(request: Request) -> KnowledgeBaseList:
    state = _state(request)
    names = state.visible_kbs(access_of(request))
    summaries = await _run(lambda: [state.kb_service.summary(n) for n in names])
    return KnowledgeBaseList(data=[KnowledgeBaseSummary(**s) for s in summaries])


@router.post("", dependencies=admin, status_code=201)
async def create_knowledge_base(body: KnowledgeBaseCreate, request: Request) -> KnowledgeBaseSummary:
    state = _state(request)
    manifest = await _run(state.kb_service.create, body.name, state.embedder)
    return KnowledgeBaseSummary(**asdict(manifest), documents=0, chunks=0)


@router.delete("/{kb}", dependencies=admin)
async def delete_knowledge_base(kb: KnowledgeBaseName, request: Request) -> Deleted:
    state = _state(request)
    _readable(request, kb)
    await _run(state.kb_service.drop, kb)
    shutil.rmtree(_upload_dir(state, kb), ignore_errors=True)
    state.jobs.forget_kb(kb)
    return Deleted(id=kb, object="knowledge_base")


@router.get("/{kb}/documents")
async def list_documents(kb: KnowledgeBaseName, request: Request) -> DocumentList:
    state = _state(request)
    _readable(request, kb)
    documents = await _run(state.kb_service.documents, kb)
    shown = await _run(state.shown_paths.for_kb, kb)
    return DocumentList(data=[DocumentInfo(**{**asdict(d), "path": shown(d.path)}, modified=_modified(d.path)) for d in documents])


@router.post(
    "/{kb}/documents",
    status_code=202,
    responses={200: {"model": UploadReport, "description": "With ?wait=true: the files were ingested."}},
)
async def upload_documents(
    kb: KnowledgeBaseName,
    request: Request,
    response: Response,
    files: list[UploadFile] = File(...),
    wait: bool = Query(False, description="Ingest before answering (200 with the per-file report) instead of returning a job (202)."),
) -> IngestJob | UploadReport:
    state = _state(request)
    _check_may_upload(request, kb)
    destination = _upload_dir(state, kb)
    if wait:
        with staging_area(state.settings.home) as staging:
            staged = await stage(files, staging, destination)
            report = await _run(state.kb_service.add, kb, [], state.embedder, staged=staged)
        shown = await _run(state.shown_paths.for_kb, kb)
        outcomes = [FileOutcomeInfo(**{**asdict(o), "path": shown(o.path)}) for o in report.outcomes]
        response.status_code = 200
        return UploadReport(data=outcomes, failed=len(report.failed))
    job_id = state.jobs.new_id()
    folder = state.jobs.job_dir(job_id)
    folder.mkdir(parents=True)
    try:
        staged = await stage(files, folder, destination)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    job = state.jobs.submit(job_id, kb, staged)
    return job_view(job, await asyncio.to_thread(shown_paths_for, state, kb))


def _check_may_upload(request: Request, kb: str) -> None:
    state = _state(request)
    validate_kb_name(kb)
    access = access_of(request)
    if not access.can_read(kb):
        _readable(request, kb)  # 404: outside this key's scope
    require_write(request, kb)
    if state.knowledge_bases.exists(kb):  # it must have been built with the server's embedder
        state.require_searchable_kb(kb, param="kb", access=access)


@router.delete("/{kb}/documents/{document_id}")
async def delete_document(kb: KnowledgeBaseName, document_id: int, request: Request) -> Deleted:
    state = _state(request)
    _readable(request, kb)
    require_write(request, kb)
    documents = await _run(state.kb_service.documents, kb)
    match = next((d for d in documents if d.id == document_id), None)
    if match is None:
        raise APIError(404, f"knowledge base '{kb}' has no document {document_id}", param="document_id", code="document_not_found")
    shown = await _run(state.shown_paths.for_kb, kb)
    await _run(state.kb_service.remove, kb, [Path(match.path)])
    if Path(match.path).parent == _upload_dir(state, kb).resolve():
        Path(match.path).unlink(missing_ok=True)
    return Deleted(id=document_id, object="document", path=shown(match.path))


def _modified(path: str) -> float | None:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return None


@router.post("/{kb}/search")
async def search(kb: KnowledgeBaseName, body: KnowledgeBaseSearch, request: Request) -> SearchResponse:
    state = _state(request)
    state.require_searchable_kb(kb, param="kb", access=access_of(request))
    threshold = state.settings.score_threshold if body.score_threshold is None else body.score_threshold
    passages = await _run(state.retriever.retrieve, kb, body.query, top_k=body.top_k, score_threshold=threshold)
    shown = await _run(state.shown_paths.for_kb, kb)
    return SearchResponse(data=[SourcePassage.of(i, p, shown) for i, p in enumerate(passages, 1)])


def validate_kb_name(name: str) -> None:
    try:
        validate_name(name)
    except KnowledgeBaseError as exc:
        raise _kb_error(exc) from None


def _upload_dir(state: ServerState, kb: str) -> Path:
    return upload_dir(state.settings.home, kb)
