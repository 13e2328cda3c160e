"""Fine-tuning jobs (OpenAI's routes) and what they leave behind: epochs, events, checkpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.archive import RESUME_ONLY, plan_tar
from api.deps import (
    CREATE_LIMITER,
    CatalogDep,
    CurrentTenant,
    QueueDep,
    SessionDep,
    SettingsDep,
    run_and_close,
)
from api.errors import NotFound
from api.jobs import cancel_job, create_job
from api.queries import checkpoint_steps, owned_job, page
from api.schemas.common import MAX_PAGE, MAX_ROW_ID, TOO_MANY_JOBS, IdCursor
from api.schemas.jobs import JobCreate, JobPublic, JobsPublic
from api.schemas.records import (
    EVENT_ID_PATTERN,
    CheckpointPublic,
    CheckpointsPublic,
    EpochPublic,
    EpochsPublic,
    EventPublic,
    EventsPublic,
    event_number,
)
from api.states import JobState
from api.tables import Checkpoint, Epoch, Event, Job

# OpenAI's paths (mounted under /v1 by api.routes: auth, id checks, errors).
router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]


# The two routes clients call most are async, their blocking work one call on a DB thread
# (api.deps.run_and_close).
@router.post("", response_model=JobPublic, responses={429: TOO_MANY_JOBS})
async def create(
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    catalog: CatalogDep,
    queue: QueueDep,
    tenant: CurrentTenant,
) -> JobPublic:
    """Create a job. Unknown model or file ids, a bad dataset, or a budget below ``rho_min`` answer 400, and
    GT_MAX_ACTIVE_JOBS jobs of the tenant already active 429, storing nothing; otherwise the job is committed
    ``queued`` and sent to the workers."""
    job = await run_and_close(
        session, create_job, session, settings, catalog, queue, tenant, body, limiter=CREATE_LIMITER
    )
    return JobPublic.of(job)


@router.get("", response_model=JobsPublic)
def list_jobs(
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Limit = 20,
    after: IdCursor = None,
    status: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
) -> JobsPublic:
    """The tenant's jobs, newest first; ``metadata[key]=value`` (repeatable) keeps the jobs whose metadata
    holds those pairs."""
    stmt = select(Job).where(Job.tenant_id == tenant.id)
    if status is not None:
        stmt = stmt.where(Job.status == str(status))
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            stmt = stmt.where(Job.user_metadata[name[9:-1]].as_string() == value)
    rows, more = page(session, stmt, Job.id, limit, after, True)
    return JobsPublic(data=[JobPublic.of(j) for j in rows], has_more=more)


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    """One job with its progress, FLOPs saved, energy and error."""
    return JobPublic.of(await run_and_close(session, owned_job, session, tenant.id, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    """Cancel a job; a running one stops within one training step. 409 for a job that already ended."""
    return JobPublic.of(cancel_job(session, owned_job(session, tenant.id, job_id)))


@router.get("/{job_id}/epochs", response_model=EpochsPublic)
def list_epochs(
    job_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Limit = MAX_PAGE,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_ROW_ID, description="the last epoch of the previous page")
    ] = None,
) -> EpochsPublic:
    """Per epoch: tensors trained, FLOPs against full fine-tuning, tokens, time, losses, energy, carbon."""
    owned_job(session, tenant.id, job_id)
    rows, more = page(session, select(Epoch).where(Epoch.job_id == job_id), Epoch.epoch, limit, after, False)
    return EpochsPublic(data=[EpochPublic.of(r) for r in rows], has_more=more)


@router.get("/{job_id}/events", response_model=EventsPublic)
def list_events(
    job_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Limit = 20,
    after: Annotated[
        str | None,
        Query(pattern=EVENT_ID_PATTERN, description="the id of the last event of the previous page"),
    ] = None,
) -> EventsPublic:
    """Status changes, selections, epochs, checkpoints and errors, newest first (OpenAI's order: a page
    ``after`` an event holds the events before it)."""
    owned_job(session, tenant.id, job_id)
    cursor = event_number(after) if after is not None else None
    rows, more = page(session, select(Event).where(Event.job_id == job_id), Event.id, limit, cursor, True)
    return EventsPublic(data=[EventPublic.of(r) for r in rows], has_more=more)


@router.get("/{job_id}/checkpoints", response_model=CheckpointsPublic)
def list_checkpoints(
    job_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Limit = 10,
    after: IdCursor = None,
) -> CheckpointsPublic:
    """One checkpoint per epoch and the final one, newest first; each names the model it can be used as
    (``fine_tuned_model_checkpoint``)."""
    job = owned_job(session, tenant.id, job_id)
    stmt = select(Checkpoint).where(Checkpoint.job_id == job_id)
    rows, more = page(session, stmt, Checkpoint.id, limit, after, True)
    step_of = {epoch: step for step, epoch in checkpoint_steps(session, job_id)}
    epochs = {e.epoch: e for e in session.scalars(select(Epoch).where(Epoch.job_id == job_id))}
    data = [CheckpointPublic.of(r, job, step_of.get(r.epoch or 0, 0), epochs.get(r.epoch or 0)) for r in rows]
    return CheckpointsPublic(data=data, has_more=more)


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/x-tar": {}}, "description": "a tar of the Hugging Face folder"}
    },
)
def checkpoint_content(
    job_id: str, checkpoint_id: str, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant
) -> StreamingResponse:
    """The checkpoint as a tar of its Hugging Face folder (config, safetensors, tokenizer) under one top
    folder named ``<job id>-<checkpoint name>``; the resume-only training state is left out."""
    owned_job(session, tenant.id, job_id)
    row = session.scalar(
        select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job_id)
    )
    if row is None:
        raise NotFound(f"checkpoint {checkpoint_id!r} not found for job {job_id!r}")
    root = f"{job_id}-{row.name}"
    session.close()  # a download can take minutes: it holds no database connection
    try:
        plan = plan_tar(settings.artifacts_dir / row.path, root, exclude=RESUME_ONLY)
    except FileNotFoundError as exc:  # the files were removed (or the volume is not mounted): not a 500
        raise NotFound(
            f"checkpoint {checkpoint_id!r} ({row.name}) of job {job_id!r} is listed, but its files "
            "are no longer in storage"
        ) from exc
    headers = {
        "Content-Length": str(plan.length),
        "Content-Disposition": f'attachment; filename="{root}.tar"',
    }
    return StreamingResponse(plan.stream(), media_type="application/x-tar", headers=headers)
