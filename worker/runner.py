"""Running one job: ``run_job(job_id, session_factory, settings)``, a plain function (the task wraps it; tests
call it without a broker).

Claim the job (``queued -> running``, or a ``running`` one whose worker died), resume from its last epoch
checkpoint if it has one, run ``greencore.train`` with callbacks that persist epochs, events and checkpoints
as they happen and that stop the run within a step of a cancel, and end the job ``succeeded`` or ``failed``
with ``error: {code, message}``: never left ``running`` by a training error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from api.catalog import ModelCatalog
from api.config import Settings
from api.db import SessionFactory
from api.errors import InvalidRequest
from api.queries import model_folder, refresh_totals
from api.recovery import give_up_or_requeue, process_gone
from api.states import add_event, claim
from api.tables import Checkpoint, Epoch, File, Job, utcnow
from greencore.spec import TrainSpec
from worker.failures import error_of
from worker.recorder import JobRecorder

log = logging.getLogger(__name__)


def worker_name() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _resume_point(session: Session, job: Job, artifacts_dir: Path) -> Checkpoint | None:
    """The latest epoch checkpoint whose folder holds its training state; records and checkpoints after it are
    dropped (those epochs run again), and so are the half-written folders a killed run left."""
    from greencore.checkpoint import STATE_FILE, remove_leftovers

    output_dir = artifacts_dir / "jobs" / job.id
    if output_dir.is_dir():
        remove_leftovers(output_dir)
    rows = session.scalars(
        select(Checkpoint)
        .where(Checkpoint.job_id == job.id, Checkpoint.epoch.is_not(None))
        .order_by(Checkpoint.epoch.desc())
    ).all()
    best = next(
        (r for r in rows if r.name.startswith("epoch-") and (artifacts_dir / r.path / STATE_FILE).is_file()),
        None,
    )
    done = best.epoch if best is not None else 0
    session.execute(delete(Epoch).where(Epoch.job_id == job.id, Epoch.epoch > done))
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.name == "final"))
    for row in rows:
        if row is not best and (row.epoch or 0) >= done and row.name != "final":
            session.delete(row)
    session.flush()
    refresh_totals(session, job.id)
    return best


def build_spec(session: Session, job: Job, settings: Settings, resume_from: Path | None) -> TrainSpec:
    """The greencore TrainSpec of a job (paths on this worker); its budget is the rho the job was created
    with (a max_flops or max_energy_kwh already converted)."""
    from greencore.spec import Hyperparameters

    known = {f.name for f in dataclasses.fields(Hyperparameters)}
    stored = {k: v for k, v in job.hyperparameters.items() if k in known}
    hp = Hyperparameters(**{**stored, "rho": job.rho, "max_flops": None, "max_energy_kwh": None})
    from greencore.models import ModelFolderError

    train_file = session.get(File, job.training_file)
    valid_file = session.get(File, job.validation_file) if job.validation_file else None
    assert train_file is not None  # a job's files keep their rows while it exists
    try:
        model_dir = model_folder(
            session, ModelCatalog(settings.models_dir), settings.artifacts_dir, job.tenant_id, job.model
        )
    except InvalidRequest as exc:  # the model went away since the job was created
        raise ModelFolderError(exc.message) from exc
    return TrainSpec(
        model_dir=str(model_dir),
        train_file=str(settings.artifacts_dir / train_file.path),
        output_dir=str(settings.artifacts_dir / "jobs" / job.id),
        method=job.method,
        valid_file=str(settings.artifacts_dir / valid_file.path) if valid_file else None,
        hyperparameters=hp,
        seed=job.seed,
        resume_from=str(resume_from) if resume_from else None,
        energy=settings.energy,
        device=settings.train_device,
    )


def run_job(
    job_id: str, session_factory: SessionFactory, settings: Settings, worker: str | None = None
) -> str:
    """Run job ``job_id`` to its end on this process; returns its status afterwards.

    A job that is not ``queued`` (nor ``running`` with a heartbeat older than GT_HEARTBEAT_STALE_S, or whose
    process on this host is gone) is left as it is: cancelled before it started, finished, or running
    elsewhere.
    """
    worker = worker or worker_name()
    with session_factory() as session:
        stale_before = utcnow() - timedelta(seconds=settings.heartbeat_stale_s)
        previous = session.scalar(select(Job.worker).where(Job.id == job_id))
        if process_gone(previous):  # its process died on this host (a pool child killed): no need to wait
            stale_before = utcnow() + timedelta(seconds=1)
        taken = claim(session, job_id, worker, stale_before)
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist", job_id)
            return "missing"
        if not taken:
            log.info("job %s is %s: not run", job_id, job.status)
            return job.status
        if job.attempts > settings.max_attempts:  # taken over from a lost worker once too often
            session.commit()
            give_up_or_requeue(session, job, settings, f"worker {previous} was lost")
            session.commit()
            return job.status
        resume = _resume_point(session, job, settings.artifacts_dir) if job.attempts > 1 else None
        if job.attempts > 1:
            where = f"from checkpoint {resume.name}" if resume else "from the start (no checkpoint yet)"
            add_event(
                session,
                job_id,
                "info",
                f"attempt {job.attempts}: resuming {where}",
                {"attempt": job.attempts, "resume_from": resume.name if resume else None},
            )
        resume_dir = settings.artifacts_dir / resume.path if resume else None
        session.commit()
    recorder = JobRecorder(session_factory, job_id, worker, settings.artifacts_dir, settings.cancel_poll_s)
    recorder.start()
    try:
        from greencore.train import train

        with session_factory() as session:
            job = session.get(Job, job_id)
            assert job is not None
            spec = build_spec(session, job, settings, resume_dir)
        report = train(
            spec, on_epoch=recorder.on_epoch, should_stop=recorder.should_stop, on_step=recorder.on_step
        )
    except Exception as exc:  # every training error ends the job failed, with its code
        log.exception("job %s failed", job_id)
        try:
            # the user's message names no server path: artifacts and models relative to their folders
            code, message = error_of(
                exc, artifacts_dir=settings.artifacts_dir, models_dir=settings.models_dir
            )
        except Exception:  # naming the error must not leave the job running
            code, message = "training_error", type(exc).__name__  # its text (and paths) are in the log above
        return recorder.fail(code, message)
    finally:
        recorder.stop()
    return recorder.finish(report)
