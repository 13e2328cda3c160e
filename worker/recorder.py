"""What a running job writes as it goes: progress and heartbeat, epochs, events, checkpoints, the end.

The training loop calls ``on_step`` and ``should_stop`` every step; both only read or write memory. A thread
of the recorder's own (``start`` / ``stop``) writes progress and the heartbeat every GT_CANCEL_POLL_S, in one
UPDATE that also tells whether the job is still this worker's running job: a job cancelled (or taken from this
worker) stops at the next step after that. The heartbeat goes on while the run profiles, measures importance,
evaluates or saves a checkpoint, so only a worker that is gone stops it (api/recovery.py acts on that).

Fencing. A job belongs to one attempt at a time: ``(jobs.worker, jobs.attempts)`` names it, and a worker
declared lost (its heartbeat older than GT_HEARTBEAT_STALE_S: paused, cut off from the database) may come back
after another worker has claimed the job. So every write of a run (progress, epochs, events, checkpoints, the
end) happens in a transaction that starts with ``UPDATE jobs ... WHERE worker = me AND attempts = my
attempt``: when that touches no row the write is refused (:class:`StaleAttempt`), nothing of it is kept, and
the run stops. The UPDATE also holds the job's row lock until the commit, so a takeover (itself an UPDATE of
that row, api/states.py) happens wholly before or wholly after each write, never in the middle of one.

The watchdog. The heartbeat says that the process lives, not that training moves. With GT_STALL_TIMEOUT_S set,
the heartbeat thread also watches the time since the last training step (or epoch end, or the run's start);
past the limit it calls ``on_stall`` (worker/runner.py: hand the job back, or fail it ``stalled``, then kill
the process: a step hung in a kernel or a collective cannot be interrupted from another thread).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.archive import folder_bytes
from api.db import SessionFactory
from api.ids import new_id
from api.queries import refresh_totals
from api.states import InvalidTransition, JobState, add_event, transition
from api.tables import Checkpoint, Epoch, Job, utcnow
from greencore.spec import EpochReport, TrainReport

log = logging.getLogger(__name__)

STALE = "stale"  # what finish/fail return when the job is no longer this attempt's


def _finite(value: float | None) -> float | None:
    # JSON and some databases refuse NaN and infinities: store them as null.
    return value if value is None or value == value and abs(value) != float("inf") else None


class StaleAttempt(RuntimeError):
    """The job is no longer this attempt's (handed back, claimed by another worker): a write was refused."""


class JobRecorder:
    """Persists attempt ``attempt`` of job ``job_id`` by ``worker``. ``stall_s``: call ``on_stall(idle_s)``
    from the heartbeat thread once no step, epoch end or start happened for that long (None: never)."""

    def __init__(
        self,
        sessions: SessionFactory,
        job_id: str,
        worker: str,
        attempt: int,
        artifacts_dir: Path,
        poll_s: float,
        stall_s: float | None = None,
        on_stall: Callable[[float], None] | None = None,
    ):
        self.sessions = sessions
        self.job_id = job_id
        self.worker = worker
        self.attempt = attempt
        self.artifacts_dir = artifacts_dir
        self.poll_s = poll_s
        self.stall_s = stall_s
        self.on_stall = on_stall
        self.stop_requested = False
        self._progress: tuple[int | None, int | None, int | None] = (None, None, None)
        self._last_progress = time.monotonic()
        self._stalled = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the heartbeat ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the heartbeat thread (a first heartbeat is written before this returns)."""
        self.sync()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat thread and wait for it."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _beat(self) -> None:
        while not self._done.wait(self.poll_s):
            try:
                self.sync()
            except Exception:  # a database hiccup must not end the heartbeat; the next one retries
                log.exception("heartbeat of job %s failed", self.job_id)
            idle_s = time.monotonic() - self._last_progress
            if self.stall_s is not None and idle_s > self.stall_s and not self._stalled:
                self._stalled = True
                log.error("job %s: no training step for %.0f s: the run is stalled", self.job_id, idle_s)
                if self.on_stall is not None:
                    self.on_stall(idle_s)

    def _owned(self) -> Any:
        """The condition under which this attempt still owns the job (whatever its status)."""
        return (Job.id == self.job_id, Job.worker == self.worker, Job.attempts == self.attempt)

    def _fence(self, session: Session) -> bool:
        """Start a write: lock the job's row if this attempt still owns it (True); otherwise roll back, ask
        the run to stop, and return False."""
        result = session.execute(
            update(Job)
            .where(*self._owned())
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            return True
        session.rollback()
        self.stop_requested = True
        log.warning("job %s: attempt %d on %s no longer owns it", self.job_id, self.attempt, self.worker)
        return False

    # -- called by the training loop every step -------------------------------------------------------------

    def on_step(self, epoch: int, step: int, steps_in_epoch: int) -> None:
        """Note progress; the heartbeat writes it."""
        self._progress = (epoch, step, steps_in_epoch)
        self._last_progress = time.monotonic()

    def should_stop(self) -> bool:
        """True once the job is no longer this worker's running job (cancelled, or handed to another)."""
        return self.stop_requested

    def sync(self) -> None:
        """Write progress and heartbeat; read whether the job is still ours and running."""
        epoch, step, steps = self._progress
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if epoch is not None:
            values.update(current_epoch=epoch, current_step=step, steps_in_epoch=steps)
        with self.sessions() as session:
            result = session.execute(
                update(Job)
                .where(*self._owned(), Job.status == str(JobState.running))
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            session.commit()
        if result.rowcount != 1 and not self.stop_requested:
            log.info("job %s is no longer running on %s: stopping", self.job_id, self.worker)
            self.stop_requested = True

    # -- called by the training loop at the end of every epoch ----------------------------------------------

    def on_epoch(self, report: EpochReport) -> None:
        """Record a greencore EpochReport, its selection and its checkpoint, in one transaction;
        :class:`StaleAttempt` (nothing recorded) once the job is no longer this attempt's."""
        self._last_progress = time.monotonic()
        with self.sessions() as session:
            if not self._fence(session):
                raise StaleAttempt(f"job {self.job_id} was taken from attempt {self.attempt}")
            existing = session.scalar(
                select(Epoch).where(Epoch.job_id == self.job_id, Epoch.epoch == report.epoch)
            )
            if existing is not None:  # the epoch ran again after a resume: the new run is the truth
                session.delete(existing)
                session.flush()
            flops = {k: int(v) for k, v in report.flops.items()}
            session.add(
                Epoch(
                    job_id=self.job_id,
                    epoch=report.epoch,
                    selected_tensors=list(report.selected_tensors),
                    flops=flops,
                    rho_achieved=report.rho_achieved,
                    tokens=report.tokens,
                    steps=report.steps,
                    truncated_examples=report.truncated_examples,
                    dropped_examples=report.dropped_examples,
                    selection=report.selection or None,
                    wall_s=report.wall_s,
                    valid_wall_s=report.valid_wall_s,
                    train_loss=_finite(report.train_loss),
                    valid_loss=_finite(report.valid_loss),
                    valid_accuracy=_finite(report.valid_accuracy),
                    valid_token_accuracy=_finite(report.valid_token_accuracy),
                    energy_j=report.energy_j,
                    energy_method=report.energy_method,
                    energy_inputs=report.energy_inputs or None,
                    gco2e=report.gco2e,
                    device=report.device_name or None,
                    world_size=report.world_size,
                    communication_bytes=report.communication_bytes,
                    communication_bytes_full=report.communication_bytes_full,
                    learning_rate=report.learning_rate or None,
                    created_at=utcnow(),
                )
            )
            n = len(report.selected_tensors)
            add_event(
                session,
                self.job_id,
                "selection",
                f"epoch {report.epoch} trains {n} tensors",
                {
                    "epoch": report.epoch,
                    "selected_tensors": list(report.selected_tensors),
                    "selection": report.selection or None,
                },
            )
            loss = f"{report.train_loss:.4f}" if report.train_loss is not None else "n/a"
            add_event(
                session,
                self.job_id,
                "epoch",
                f"epoch {report.epoch} done: {report.rho_achieved:.3f} of full fine-tuning FLOPs, "
                f"train_loss {loss}, {report.wall_s:.1f} s, {report.energy_j:.1f} J",
                {"epoch": report.epoch, "flops": flops, "rho_achieved": report.rho_achieved},
            )
            if report.checkpoint_dir:
                self._add_checkpoint(
                    session, Path(report.checkpoint_dir), f"epoch-{report.epoch}", report.epoch
                )
            session.flush()
            refresh_totals(session, self.job_id)
            session.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(current_epoch=report.epoch, current_step=report.steps, steps_in_epoch=report.steps)
                .execution_options(synchronize_session=False)
            )
            session.commit()

    def _add_checkpoint(self, session: Session, folder: Path, name: str, epoch: int | None) -> None:
        relative = folder.resolve().relative_to(self.artifacts_dir).as_posix()
        old = session.scalar(
            select(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.name == name)
        )
        if old is not None:
            session.delete(old)
            session.flush()
        session.add(
            Checkpoint(
                id=new_id("ckpt"),
                job_id=self.job_id,
                name=name,
                epoch=epoch,
                path=relative,
                bytes=folder_bytes(folder),
                created_at=utcnow(),
            )
        )
        add_event(
            session, self.job_id, "checkpoint", f"checkpoint {name} written", {"name": name, "epoch": epoch}
        )

    # -- the end -------------------------------------------------------------------------------------------

    def finish(self, report: TrainReport) -> str:
        """Record the final checkpoint and end the job ``succeeded`` (a stopped run keeps the state that
        stopped it). Returns the job's status, or ``"stale"`` (nothing written) once the job is no longer
        this attempt's."""
        with self.sessions() as session:
            if not self._fence(session):
                return STALE
            job = session.get(Job, self.job_id)
            assert job is not None
            if report.final_checkpoint_dir and not report.stopped:
                last = report.epochs[-1].epoch if report.epochs else job.current_epoch
                self._add_checkpoint(session, Path(report.final_checkpoint_dir), "final", last)
            if report.stopped:
                add_event(
                    session,
                    self.job_id,
                    "info",
                    f"training stopped at epoch {job.current_epoch}, step "
                    f"{job.current_step}; the last checkpoint is kept",
                )
            else:
                try:
                    transition(session, job, JobState.succeeded, message="job succeeded")
                except InvalidTransition:  # cancelled in the last instant: the user's word stands
                    pass
            session.commit()
            return job.status

    def fail(self, code: str, message: str) -> str:
        """End the job ``failed`` with ``error: {code, message}`` (unless it was cancelled meanwhile); nothing
        written, and ``"stale"`` returned, once the job is no longer this attempt's."""
        with self.sessions() as session:
            if not self._fence(session):
                return STALE
            job = session.get(Job, self.job_id)
            assert job is not None
            try:
                transition(session, job, JobState.failed, error=(code, message), message="job failed")
            except InvalidTransition:
                add_event(session, self.job_id, "error", f"{code}: {message}", {"code": code}, level="error")
            session.commit()
            return job.status
