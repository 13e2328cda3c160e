"""Running one job: ``run_job(job_id, session_factory, settings)``, a plain function (the task wraps it; tests
call it without a broker).

Claim the job (``queued -> running``, or a ``running`` one whose worker died), resume from its last epoch
checkpoint if it has one, run ``greencore.train`` with callbacks that persist epochs, events and checkpoints
as they happen and that stop the run within a step of a cancel, and end the job ``succeeded`` or ``failed``
with ``error: {code, message}``: never left ``running`` by a training error.

Each attempt writes its own folder, ``jobs/<id>/attempt-<n>/``, and every database write of a run is fenced
by its attempt (worker/recorder.py): a worker that was declared lost and comes back can neither write into
the records of the attempt that took over nor delete that attempt's files; it stops at its first refused
write. An attempt that resumes reads the checkpoint it resumes from wherever an earlier attempt wrote it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
from datetime import timedelta
from pathlib import Path

from sqlalchemy import and_, delete, select
from sqlalchemy.orm import Session

from api.catalog import ModelCatalog
from api.config import Settings
from api.db import SessionFactory
from api.errors import InvalidRequest
from api.queries import model_folder, refresh_totals
from api.queue import JobQueue
from api.recovery import give_up_or_requeue, process_gone
from api.states import InvalidTransition, add_event, claim
from api.tables import Checkpoint, Epoch, File, Job, utcnow
from greencore.spec import TrainSpec
from worker.failures import error_of
from worker.ranks import RUN_DIR, RankLost, train_on_ranks
from worker.recorder import STALE, JobRecorder, StaleAttempt

log = logging.getLogger(__name__)


def worker_name() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def attempt_dir(artifacts_dir: Path, job_id: str, attempt: int) -> Path:
    """The folder attempt ``attempt`` of a job writes its checkpoints into."""
    return artifacts_dir / "jobs" / job_id / f"attempt-{attempt}"


def _resume_point(session: Session, job: Job, artifacts_dir: Path) -> tuple[Checkpoint | None, list[Path]]:
    """The latest epoch checkpoint whose folder holds its training state, and the folders of the checkpoints
    dropped after it (those epochs run again: the caller removes the folders once the drop commits). Earlier
    attempts' folders are otherwise left alone: a lost worker may still be writing there (its records are
    refused; see the module's docstring)."""
    from greencore.checkpoint import STATE_FILE

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
    finals = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.name == "final")
    )
    dropped = [*finals, *(r for r in rows if r is not best and (r.epoch or 0) >= done and r.name != "final")]
    for row in dropped:
        session.delete(row)
    session.flush()
    refresh_totals(session, job.id)
    return best, [artifacts_dir / row.path for row in dropped]


def build_spec(
    session: Session, job: Job, settings: Settings, resume_from: Path | None, attempt: int
) -> TrainSpec:
    """The greencore TrainSpec of attempt ``attempt`` of a job (paths on this worker); its budget is the rho
    the job was created with (a max_flops or max_energy_kwh already converted)."""
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
        output_dir=str(attempt_dir(settings.artifacts_dir, job.id, attempt)),
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
    """Run job ``job_id`` to its end on this process; returns its status afterwards (``"stale"`` when the job
    was taken from this run meanwhile: then this run wrote nothing after that).

    A job that is not ``queued`` (nor ``running`` with a heartbeat older than GT_HEARTBEAT_STALE_S, or whose
    process on this host is gone) is left as it is: cancelled before it started, finished, or running
    elsewhere. With GT_STALL_TIMEOUT_S set, a run with no training step for that long is handed back (or
    failed ``stalled``) and this process is killed (:func:`_stalled`).
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
        attempt = job.attempts
        job.world_size = settings.worker_nproc
        if attempt > settings.max_attempts:  # taken over from a lost worker once too often
            session.commit()
            give_up_or_requeue(session, job, settings, f"worker {previous} was lost")
            session.commit()
            return job.status
        resume, dropped = _resume_point(session, job, settings.artifacts_dir) if attempt > 1 else (None, [])
        if attempt > 1:
            where = f"from checkpoint {resume.name}" if resume else "from the start (no checkpoint yet)"
            add_event(
                session,
                job_id,
                "info",
                f"attempt {attempt}: resuming {where}",
                {"attempt": attempt, "resume_from": resume.name if resume else None},
            )
        resume_dir = settings.artifacts_dir / resume.path if resume else None
        session.commit()
    for folder in dropped:
        shutil.rmtree(folder, ignore_errors=True)
    recorder = JobRecorder(
        session_factory,
        job_id,
        worker,
        attempt,
        settings.artifacts_dir,
        settings.cancel_poll_s,
        stall_s=settings.stall_timeout_s or None,
        on_stall=lambda idle_s: _stalled(session_factory, settings, job_id, worker, attempt, idle_s),
    )
    recorder.start()
    try:
        from greencore.train import train

        with session_factory() as session:
            job = session.get(Job, job_id)
            assert job is not None
            spec = build_spec(session, job, settings, resume_dir, attempt)
            estimate = job.estimate or {}
        peak = (estimate.get("peak_memory_bytes") or {}).get("method")
        if peak is not None:  # a job that cannot fit this worker's devices fails now, not after an OOM
            from greencore.memory import check_fits

            if (estimate.get("memory") or {}).get("world_size", 1) != settings.worker_nproc:
                # Estimated for another number of ranks (an API with another GT_WORKER_NPROC): this
                # worker's own.
                from greencore.train import peak_memory_bytes

                peak = peak_memory_bytes(spec, settings.worker_nproc)
            check_fits(peak, spec.device, settings.device_memory_bytes)
        hooks = {
            "on_epoch": recorder.on_epoch,
            "should_stop": recorder.should_stop,
            "on_step": recorder.on_step,
        }
        if settings.worker_nproc > 1:
            report = train_on_ranks(spec, settings.worker_nproc, **hooks)
        else:
            report = train(spec, **hooks)
    except StaleAttempt:
        log.warning("job %s was taken from this worker: this run stops, its records refused", job_id)
        return STALE
    except RankLost as exc:  # as for a lost worker: handed back to resume from its last epoch, or failed
        log.error("job %s: %s", job_id, exc)
        reason = f"{exc} on {worker}"
        status = _hand_back(session_factory, settings, job_id, worker, attempt, reason, "worker_lost")
    except Exception as exc:  # every training error ends the job failed, with its code
        log.exception("job %s failed", job_id)
        try:
            # the user's message names no server path: artifacts and models relative to their folders
            code, message = error_of(
                exc, artifacts_dir=settings.artifacts_dir, models_dir=settings.models_dir
            )
        except Exception:  # naming the error must not leave the job running
            code, message = "training_error", type(exc).__name__  # its text (and paths) are in the log above
        status = recorder.fail(code, message)
    else:
        status = recorder.finish(report)
    finally:
        recorder.stop()
    if status != STALE:
        _tidy(settings.artifacts_dir / "jobs" / job_id)
    return status


def _tidy(job_dir: Path) -> None:
    """Remove what killed writes left in every attempt's folder of a job (``.*.tmp-*``, ``.*.old-*``, the
    files of ranks whose worker was killed): once its last attempt has ended, nothing of the job is being
    written any more (a lost attempt that still runs somewhere has every write refused)."""
    from greencore.checkpoint import remove_leftovers

    for folder in job_dir.glob("attempt-*"):
        remove_leftovers(folder)
        shutil.rmtree(folder / RUN_DIR, ignore_errors=True)


def _stalled(
    sessions: SessionFactory, settings: Settings, job_id: str, worker: str, attempt: int, idle_s: float
) -> None:
    """The watchdog's action (called from the heartbeat thread): hand the job back (:func:`_hand_back`), then
    kill this process, the only sure way to end a step hung in native code; Celery's pool starts a fresh child
    in its place (a job's ranks die with it: worker/ranks.py)."""
    reason = (
        f"no training step completed for {idle_s:.0f} s on {worker} "
        f"(limit GT_STALL_TIMEOUT_S={settings.stall_timeout_s:g} s): the run was stalled and is killed"
    )
    try:
        _hand_back(sessions, settings, job_id, worker, attempt, reason, "stalled")
    finally:
        log.error("job %s: %s", job_id, reason)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def _hand_back(
    sessions: SessionFactory,
    settings: Settings,
    job_id: str,
    worker: str,
    attempt: int,
    reason: str,
    code: str,
) -> str:
    """Hand the job back to the queue, or fail it ``code`` once it has been started GT_MAX_ATTEMPTS times, if
    this attempt still owns it; returns its status after (``"stale"`` when it was no longer this attempt's).
    The job is enqueued here rather than left to the broker's redelivery of the task (which a solo worker's
    broker may hold back for GT_VISIBILITY_TIMEOUT_S); a second message is harmless: the job can be claimed
    once."""
    requeue, status = False, STALE
    try:
        with sessions() as session:
            job = session.get(Job, job_id)
            if job is not None:
                mine = and_(Job.worker == worker, Job.attempts == attempt)
                try:
                    requeue = give_up_or_requeue(session, job, settings, reason, mine, code=code)
                    status = job.status
                except InvalidTransition:
                    log.warning("job %s moved on meanwhile (cancelled, taken over): not handed back", job_id)
                    status = job.status if (job.worker, job.attempts) == (worker, attempt) else STALE
                session.commit()
        if requeue:
            queue = JobQueue(settings)
            try:
                queue.enqueue_job(job_id)
            finally:
                queue.close()
    except Exception:  # the database or the broker is down: recovery requeues the job once the beat stops
        log.exception("job %s: could not hand back the run", job_id)
    return status
