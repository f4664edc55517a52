"""Ingestion jobs over HTTP: list, look up, follow (Server-Sent Events), cancel, retry.

A job belongs to a knowledge base: whoever may read it may watch its jobs; whoever
may change it may cancel and retry them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from api.auth import access_of, require_key, require_write
from api.errors import APIError, error_responses
from api.jobs import Job
from api.protocol import FileOutcomeInfo, IngestJob, IngestJobList, JobFile
from api.state import ServerState, require_ready
from memory.knowledge_base import KB_NAME_RULE

router = APIRouter(
    prefix="/v1/knowledge_bases/{kb}/jobs",
    dependencies=[Depends(require_key), Depends(require_ready)],
    responses=error_responses(400, 401, 403, 404, 409, 503),
)
KnowledgeBaseName = Annotated[str, PathParam(description=KB_NAME_RULE)]
JobId = Annotated[str, PathParam(description="The id an upload answered with.")]
EVENT_POLL_S = 0.25
EVENT_KEEPALIVE_S = 15.0


def job_view(job: Job, shown: Callable[[str], str]) -> IngestJob:
    """The API's view of a job: paths as the client may see them."""
    return IngestJob(
        id=job.id,
        knowledge_base=job.kb,
        state=job.state,
        created=job.created,
        started=job.started,
        finished=job.finished,
        files_total=job.files_total,
        files_done=job.files_done,
        chunks_total=job.chunks_total,
        chunks_embedded=job.chunks_embedded,
        ocr_pages_read=job.ocr_pages_read,
        files=_job_files(job, shown),
        outcomes=[FileOutcomeInfo(**{**o, "path": shown(o["path"])}) for o in job.outcomes],
        error=job.error,
        retry_of=job.retry_of,
    )


def _job_files(job: Job, shown: Callable[[str], str]) -> list[JobFile]:
    outcomes = {o["path"]: o for o in job.outcomes}
    processed = set(job.finished_paths)
    files = []
    for _, destination in job.files:
        resolved = str(Path(destination).resolve())
        outcome = outcomes.get(resolved) or outcomes.get(destination)
        if outcome is not None:
            files.append(JobFile(name=shown(resolved), state=outcome["outcome"], chunks=outcome["chunks"], error=outcome["error"]))
        else:
            files.append(JobFile(name=shown(resolved), state="processed" if resolved in processed else "waiting"))
    return files


def _state(request: Request) -> ServerState:
    return request.app.state.zhiku


def shown_paths_for(state: ServerState, kb: str) -> Callable[[str], str]:
    """How ``kb``'s paths are shown (bare names while the knowledge base does not exist yet)."""
    try:
        return state.shown_paths.for_kb(kb)
    except Exception:  # the knowledge base is gone or not created yet: show bare names
        return lambda path: path.rsplit("/", 1)[-1]


def _job(request: Request, kb: str, job_id: str) -> Job:
    state = _state(request)
    access = access_of(request)
    job = state.jobs.get(job_id)
    if job is None or job.kb != kb or not access.can_read(kb):
        raise APIError(404, f"knowledge base '{kb}' has no job '{job_id}'", param="job_id", code="job_not_found")
    return job


@router.get("")
async def list_jobs(kb: KnowledgeBaseName, request: Request) -> IngestJobList:
    state = _state(request)
    if not access_of(request).can_read(kb):
        state.require_kb(kb, param="kb", access=access_of(request))
    shown = await asyncio.to_thread(shown_paths_for, state, kb)
    jobs = sorted(state.jobs.list(kb), key=lambda j: j.created, reverse=True)
    return IngestJobList(data=[job_view(j, shown) for j in jobs])


@router.get("/{job_id}")
async def get_job(kb: KnowledgeBaseName, job_id: JobId, request: Request) -> IngestJob:
    job = _job(request, kb, job_id)
    return job_view(job, await asyncio.to_thread(shown_paths_for, _state(request), kb))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "One `job` event (an IngestJob) per change; ends when the job does."}},
)
async def follow_job(kb: KnowledgeBaseName, job_id: JobId, request: Request) -> StreamingResponse:
    job = _job(request, kb, job_id)
    state = _state(request)
    return StreamingResponse(
        _job_events(state, job, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _job_events(state: ServerState, job: Job, request: Request) -> AsyncIterator[str]:
    sent, quiet = -1, 0.0
    while not await request.is_disconnected():
        if job.version != sent:
            sent = job.version
            shown = await asyncio.to_thread(shown_paths_for, state, job.kb)
            yield f"event: job\ndata: {json.dumps(job_view(job, shown).model_dump(), ensure_ascii=False)}\n\n"
            quiet = 0.0
            if job.final:
                return
        elif quiet >= EVENT_KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet = 0.0
        await asyncio.sleep(EVENT_POLL_S)
        quiet += EVENT_POLL_S


@router.delete("/{job_id}")
async def cancel_job(kb: KnowledgeBaseName, job_id: JobId, request: Request) -> IngestJob:
    """Cancel a queued or running job (a finished one is returned as it is)."""
    job = _job(request, kb, job_id)
    require_write(request, kb)
    state = _state(request)
    state.jobs.cancel(job)
    return job_view(job, await asyncio.to_thread(shown_paths_for, state, kb))


@router.post("/{job_id}/retry", status_code=202)
async def retry_job(kb: KnowledgeBaseName, job_id: JobId, request: Request) -> IngestJob:
    """Re-run the files a failed (e.g. interrupted) or cancelled job did not commit, as a new job."""
    job = _job(request, kb, job_id)
    require_write(request, kb)
    state = _state(request)
    if not job.final or job.state == "done":
        raise APIError(409, f"job '{job_id}' is {job.state}: only a failed or cancelled job can be retried", param="job_id", code="job_not_retryable")
    retried = await asyncio.to_thread(state.jobs.retry, job)
    if retried is None:
        raise APIError(409, f"job '{job_id}' left no files to retry", param="job_id", code="job_not_retryable")
    return job_view(retried, await asyncio.to_thread(shown_paths_for, state, kb))
