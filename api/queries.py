"""Reads scoped to a tenant, and cursor pagination. Another tenant's object is answered as not found."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session

from api.catalog import ModelCatalog
from api.errors import InvalidRequest, NotFound
from api.ids import is_id
from api.states import JobState
from api.tables import Checkpoint, Epoch, File, Job

T = TypeVar("T")


def owned_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """The tenant's job ``job_id``; NotFound (404) otherwise."""
    job = (
        session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
        if is_id(job_id)
        else None
    )
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    return job


def owned_file(session: Session, tenant_id: str, file_id: str, *, param: str | None = None) -> File:
    """The tenant's file ``file_id``. From a path: NotFound (404); named in a body (``param`` set):
    InvalidRequest (400) naming the parameter. A string that cannot be an id is not looked up."""
    row = (
        session.scalar(
            select(File).where(File.id == file_id, File.tenant_id == tenant_id, File.deleted_at.is_(None))
        )
        if is_id(file_id)
        else None
    )
    if row is None:
        if param is not None:
            raise InvalidRequest(
                f"{param} {file_id[:64]!r} not found: upload it with POST /v1/files", param=param
            )
        raise NotFound(f"file {file_id!r} not found")
    return row


def page(
    session: Session, stmt: Select[Any], key: Any, limit: int, after: Any, descending: bool
) -> tuple[list[Any], bool]:
    """One page of ``stmt`` ordered by ``key`` (a unique column), starting after the cursor ``after``.

    Returns (rows, has_more).
    """
    if after is not None:
        stmt = stmt.where(key < after if descending else key > after)
    stmt = stmt.order_by(key.desc() if descending else key.asc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    return rows[:limit], len(rows) > limit


def refresh_totals(session: Session, job_id: str) -> None:
    """Recompute a job's sums over its recorded epochs (FLOPs, energy, carbon, tokens, bytes exchanged,
    count); the caller commits."""
    epochs_done, flops_total, flops_full, energy_j, gco2e, tokens = 0, 0, 0, 0.0, 0.0, 0
    communication, communication_full = 0, 0
    for flops, energy, grams, epoch_tokens, sent, sent_full in session.execute(
        select(
            Epoch.flops,
            Epoch.energy_j,
            Epoch.gco2e,
            Epoch.tokens,
            Epoch.communication_bytes,
            Epoch.communication_bytes_full,
        ).where(Epoch.job_id == job_id)
    ):
        epochs_done += 1
        tokens += epoch_tokens or 0
        communication += sent or 0
        communication_full += sent_full or 0
        flops_total += int(flops.get("total", 0) or 0)
        flops_full += int(flops.get("full", 0) or 0)
        energy_j += energy or 0.0
        gco2e += grams or 0.0
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            epochs_done=epochs_done,
            flops_total=flops_total,
            flops_full=flops_full,
            energy_j=energy_j,
            gco2e=gco2e,
            trained_tokens=tokens,
            communication_bytes=communication,
            communication_bytes_full=communication_full,
        )
        .execution_options(synchronize_session=False)
    )


def model_folder(
    session: Session, catalog: ModelCatalog, artifacts_dir: Path, tenant_id: str, model_id: str
) -> Path:
    """The folder of a model a job may start from: a base model of the catalog, or one of the tenant's
    fine-tuned models (``ft:{base}:{suffix}:{job id}``: its job's final checkpoint; with ``:ckpt-step-N``
    after it, the checkpoint of the epoch that ended at step N). InvalidRequest (400) naming ``model``
    otherwise."""
    if not model_id.startswith("ft:"):
        return catalog.path(model_id)
    parts = model_id.split(":")
    step = None
    if len(parts) == 5 and parts[4].startswith("ckpt-step-") and parts[4][10:].isdigit():
        step, parts = int(parts[4][10:]), parts[:4]
    job_id = parts[-1] if len(parts) == 4 else ""
    job = (
        session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
        if is_id(job_id)
        else None
    )
    row = None
    if job is not None and step is None and job.status == JobState.succeeded:
        final = select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.name == "final")
        row = session.scalar(final)
    elif job is not None and step is not None:
        epoch = dict(checkpoint_steps(session, job.id)).get(step)
        row = session.scalar(
            select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.name == f"epoch-{epoch}")
        )
    if row is None:
        raise InvalidRequest(
            f"model {model_id[:200]!r} not found: fine-tuned models are listed by GET /v1/models",
            param="model",
        )
    return artifacts_dir / row.path


def checkpoint_steps(session: Session, job_id: str) -> list[tuple[int, int]]:
    """(optimizer steps done by the end of the epoch, epoch) for each recorded epoch of a job, in order."""
    steps, out = 0, []
    for epoch, n in session.execute(
        select(Epoch.epoch, Epoch.steps).where(Epoch.job_id == job_id).order_by(Epoch.epoch)
    ):
        steps += n or 0
        out.append((steps, epoch))
    return out
