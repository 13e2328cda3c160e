"""Job states and the only ways a job moves between them; the API and the worker both go through here.

``validating_files -> queued -> running -> succeeded | failed | cancelled`` (OpenAI's names), and
``cancelled`` from any non-terminal state. ``running -> queued`` hands a job back (its worker went away).
Every change is a conditional UPDATE (``WHERE status IN (states allowed to move there)``), so that two
processes racing (a cancel and the worker's success) cannot both win, and every change writes a ``status``
event in the same transaction.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from api.tables import Event, Job, utcnow


class JobState(StrEnum):
    validating = "validating_files"  # OpenAI's name
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.validating: frozenset({JobState.queued, JobState.failed, JobState.cancelled}),
    JobState.queued: frozenset({JobState.running, JobState.failed, JobState.cancelled}),
    JobState.running: frozenset({JobState.succeeded, JobState.failed, JobState.cancelled, JobState.queued}),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}


class InvalidTransition(Exception):
    """The job is not in a state from which it may move to ``target``."""

    def __init__(self, job_id: str, status: str, target: JobState) -> None:
        super().__init__(f"job {job_id} is {status}: it cannot become {target}")
        self.job_id = job_id
        self.status = status
        self.target = target


def sources(target: JobState) -> list[str]:
    """The states from which a job may move to ``target``."""
    return [str(s) for s, targets in TRANSITIONS.items() if target in targets]


def add_event(
    session: Session,
    job_id: str,
    type_: str,
    message: str,
    data: dict[str, Any] | None = None,
    level: str = "info",
) -> Event:
    """Append an event to job ``job_id``'s log, committed with the caller's transaction; returns it (its id
    is given at the next flush).

    Pollers page events by id (``after=ftevent-N``) and stop at the last id they saw, so within one job the
    ids must become visible in id order: no event may commit after a higher id of the same job was seen. An
    id comes from the sequence at INSERT, and transactions commit in any order, so every writer of a job's
    events first locks the job's row and keeps the lock to its commit: ids of one job are then handed out,
    and committed, one transaction at a time. On PostgreSQL the lock is ``FOR NO KEY UPDATE`` (what an
    UPDATE of the row takes: ``transition`` and ``claim`` hold it already, and the foreign-key checks of
    inserts, which take ``FOR KEY SHARE``, do not conflict with it, so a transaction that inserted an epoch
    or a checkpoint of the job first cannot deadlock against one that updated the row first). It is taken
    before anything pending in the session is flushed, so that no event of this transaction gets an id
    before the lock. No deadlock: every transaction that writes events writes them for one job only, and
    none waits for this row while holding a row that another writer of the job's events locks first.
    SQLite ignores the lock: its writers are serialised by the database's write lock, held from the first
    INSERT to the commit. Across jobs, ids stay unordered by commit: no listing reads several jobs' events.
    """
    with session.no_autoflush:
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update(key_share=True))
    event = Event(job_id=job_id, type=type_, level=level, message=message, data=data, created_at=utcnow())
    session.add(event)
    return event


def transition(
    session: Session,
    job: Job,
    target: JobState,
    *,
    message: str | None = None,
    error: tuple[str, str] | None = None,
    data: dict[str, Any] | None = None,
    condition: Any = None,
) -> None:
    """Move ``job`` to ``target`` or raise :class:`InvalidTransition` (nothing changed). ``error``: (code,
    message) of a failure; ``condition``: an extra SQL condition the row must meet (checked in the same
    UPDATE). The caller commits."""
    now = utcnow()
    values: dict[str, Any] = {"status": str(target)}
    if target in TERMINAL:
        values["finished_at"] = now
    if target is JobState.queued:
        values["worker"] = None
    if error is not None:
        values["error_code"], values["error_message"] = error
    where = [Job.id == job.id, Job.status.in_(sources(target))]
    if condition is not None:
        where.append(condition)
    result = session.execute(
        update(Job).where(*where).values(**values).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.refresh(job)
        raise InvalidTransition(job.id, job.status, target)
    for key, value in values.items():
        set_committed_value(job, key, value)
    level = "error" if target is JobState.failed else "info"
    text = message or f"job {target}"
    if error is not None:
        text = f"{text}: {error[0]}: {error[1]}"
    add_event(session, job.id, "status", text, {"status": str(target), **(data or {})}, level)


def admit(session: Session, job: Job, events: list[tuple[str, str, dict[str, Any] | None]]) -> None:
    """Add a new, validated job: it enters ``validating_files`` and leaves it for ``queued`` in the same
    transaction, both status events written (nobody can see or race on a row not yet committed). ``events``:
    more (type, message, data) to log between the two. The caller commits, then enqueues."""
    job.status = str(JobState.queued)
    session.add(job)
    session.flush()  # the job's row first: events refer to it
    add_event(session, job.id, "status", "job created", {"status": str(JobState.validating)})
    for type_, message, data in events:
        add_event(session, job.id, type_, message, data)
    add_event(
        session,
        job.id,
        "status",
        "job validated and queued",
        {"status": str(JobState.queued), "rho": job.rho, "rho_min": job.rho_min},
    )


def claim(session: Session, job_id: str, worker: str, stale_before: datetime) -> bool:
    """Take a job for ``worker``: ``queued -> running``, or a ``running`` job whose heartbeat is older than
    ``stale_before`` (its worker died; the broker delivered it again). Counts an attempt. The caller
    commits."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            or_(
                Job.status == str(JobState.queued),
                and_(
                    Job.status == str(JobState.running),
                    or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before),
                ),
            ),
        )
        .values(
            status=str(JobState.running),
            worker=worker,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    add_event(session, job_id, "status", f"job running on {worker}", {"status": str(JobState.running)})
    return True
