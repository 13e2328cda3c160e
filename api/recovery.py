"""The database is the truth about jobs; recovery makes the broker and the workers agree with it.

``recover`` runs when the API starts, when a worker starts, and every GT_RECOVERY_INTERVAL_S in every worker:

- A ``running`` job whose heartbeat is older than GT_HEARTBEAT_STALE_S (or whose process on this host is gone)
  lost its worker: it goes back to ``queued`` and is enqueued again, with an event saying why, or ends
  ``failed`` with ``worker_lost`` once it has been started GT_MAX_ATTEMPTS times. Its next run resumes from
  its last epoch checkpoint (worker/runner.py).
- A ``queued`` job that the broker no longer holds (Redis restarted with nothing on disk, the embedded
  broker's file lost, a worker killed after it took the message) is enqueued again.

Several processes may recover at once: every change is a conditional UPDATE through :mod:`api.states`, so one
of them wins and only the winner enqueues. An extra message for a job is harmless anyway: a worker runs a job
only when it can claim it (``queued -> running``), so a duplicate delivery finds it taken and does nothing.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, create_engine, or_, select, text
from sqlalchemy.orm import Session

from api.config import Settings
from api.datasets import sweep_uploads
from api.db import SessionFactory
from api.queue import JobQueue
from api.states import InvalidTransition, JobState, transition
from api.tables import Job, utcnow
from api.task_names import JOBS_QUEUE

log = logging.getLogger(__name__)

# A queued job younger than this is not looked for in the broker: its creator may not have sent it yet.
ENQUEUE_GRACE_S = 10.0
# kombu's Redis transport keeps a queue's ready messages in one list per priority step (0 has no suffix).
_REDIS_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


@dataclass
class Recovery:
    """What one ``recover`` call did (job ids)."""

    requeued: list[str] = field(default_factory=list)  # running jobs whose worker went silent, queued again
    failed: list[str] = field(default_factory=list)  # the same, out of attempts
    reenqueued: list[str] = field(default_factory=list)  # queued jobs the broker had lost

    def __bool__(self) -> bool:
        return bool(self.requeued or self.failed or self.reenqueued)


def process_gone(worker: str | None) -> bool:
    """Whether ``worker`` (``host:pid``) was a process on this host that no longer exists: gone, or dead and
    not yet reaped (a zombie: a killed worker's pool child whose parent died with it waits for init to reap
    it, which may take a minute or never happen where nothing reaps orphans)."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # Linux: the state letter follows the command name in parentheses
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False  # no procfs: the process exists
    return state in ("Z", "X")


def _job_id_of(payload: str | bytes) -> str | None:
    """The job id a RUN_JOB message carries (Celery's protocol 2: body = [args, kwargs, embed])."""
    try:
        message = json.loads(payload)
        body: Any = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def broker_job_ids(settings: Settings) -> set[str] | None:
    """Ids of the jobs waiting in the broker's queue (messages not yet delivered), or None when this broker
    cannot be read (then every queued job is enqueued again: a duplicate does no harm)."""
    url = str(settings.broker_url)
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url)
        try:
            payloads = []
            for suffix in _REDIS_PRIORITY_SUFFIXES:
                payloads += client.lrange(f"{settings.broker_prefix}{JOBS_QUEUE}{suffix}", 0, -1)
        finally:
            client.close()
    elif url.startswith(("sqla+", "sqlalchemy+")):
        engine = create_engine(url.split("+", 1)[1])
        try:
            with engine.connect() as conn:
                tables = set(conn.dialect.get_table_names(conn))
                if not {"kombu_queue", "kombu_message"} <= tables:
                    return set()  # nothing was ever sent
                payloads = list(
                    conn.scalars(
                        text(
                            "SELECT m.payload FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id "
                            "WHERE q.name = :queue AND m.visible"
                        ),
                        {"queue": JOBS_QUEUE},
                    )
                )
        finally:
            engine.dispose()
    else:
        return None
    return {job_id for job_id in map(_job_id_of, payloads) if job_id is not None}


def _stale(session: Session, stale_before: datetime) -> list[tuple[Job, bool]]:
    """Running jobs whose heartbeat is older than ``stale_before`` (False), or whose process on this host is
    gone while its heartbeat is still fresh (True)."""
    silent = session.scalars(
        select(Job).where(
            Job.status == str(JobState.running),
            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before),
        )
    ).all()
    local = session.scalars(
        select(Job).where(
            Job.status == str(JobState.running),
            Job.worker.like(f"{socket.gethostname()}:%"),
            Job.heartbeat_at >= stale_before,
        )
    ).all()
    return [*((job, False) for job in silent), *((job, True) for job in local if process_gone(job.worker))]


def give_up_or_requeue(
    session: Session,
    job: Job,
    settings: Settings,
    reason: str,
    condition: Any = None,
    code: str = "worker_lost",
) -> bool:
    """Move a running job that lost its worker (or whose run stalled) to ``queued`` (True: the caller enqueues
    it after commit) or, once it has been started GT_MAX_ATTEMPTS times, to ``failed`` with ``code`` (False).
    ``condition``: an extra SQL condition the move needs (the heartbeat still stale, the attempt still the
    one that stalled). InvalidTransition when another process moved it first."""
    if job.attempts >= settings.max_attempts:
        message = f"{reason}; it was started {job.attempts} times (GT_MAX_ATTEMPTS={settings.max_attempts})"
        transition(
            session,
            job,
            JobState.failed,
            error=(code, message),
            message="job failed",
            condition=condition,
        )
        return False
    transition(
        session,
        job,
        JobState.queued,
        message=f"{reason}: queued again to resume from its last checkpoint",
        data={"attempts": job.attempts, "previous_worker": job.worker},
        condition=condition,
    )
    return True


def recover(
    sessions: SessionFactory, settings: Settings, queue: JobQueue, grace_s: float = ENQUEUE_GRACE_S
) -> Recovery:
    """Requeue (or fail) running jobs whose worker went silent, enqueue queued jobs the broker lost; see the
    module's docstring. Broker errors propagate (nothing is changed in the database by a failed enqueue: the
    job stays queued and the next recovery tries again)."""
    done = Recovery()
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.heartbeat_stale_s)
    with sessions() as session:
        for job, gone in _stale(session, stale_before):
            if gone:
                reason = f"worker {job.worker} is gone (its process no longer exists)"
                condition = Job.worker == job.worker
            else:
                seen = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "never"
                reason = (
                    f"no heartbeat from worker {job.worker} since {seen} "
                    f"(limit GT_HEARTBEAT_STALE_S={settings.heartbeat_stale_s:g} s)"
                )
                condition = and_(
                    Job.worker == job.worker, or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before)
                )
            try:
                requeue = give_up_or_requeue(session, job, settings, reason, condition)
            except InvalidTransition:
                session.rollback()
                continue  # it moved meanwhile (a heartbeat, a cancel, another recovery)
            session.commit()
            (done.requeued if requeue else done.failed).append(job.id)
            log.warning("job %s: %s", job.id, reason)
        waiting = broker_job_ids(settings)
        young = now - timedelta(seconds=grace_s)
        queued = session.scalars(
            select(Job.id)
            .where(Job.status == str(JobState.queued), Job.created_at < young)
            .order_by(Job.created_at)
        ).all()
        lost = [j for j in queued if j not in done.requeued and (waiting is None or j not in waiting)]
    for job_id in [*done.requeued, *lost]:
        queue.enqueue_job(job_id)
    done.reenqueued = lost
    if lost:
        log.warning("enqueued again %d queued job(s) the broker did not hold: %s", len(lost), ", ".join(lost))
    sweep_uploads(sessions, settings)  # files of uploads that died before their row committed
    return done
