"""A poller that follows a job's events with ``after=`` cursors never misses one (issue 18).

Event ids come from a sequence at INSERT, and transactions commit in any order: without a lock, writer A takes
id 10, writer B takes id 11 and commits first, a poller reads 11 and stops at it ever after, and A's 10, which
commits next, is never seen. ``api.states.add_event`` locks the job's row first, so that B waits for A's
commit. The poller here is the command line's (``api.progress.new_events``), reading the real HTTP route.
"""

from __future__ import annotations

import random
import threading
import time

from fastapi.testclient import TestClient
from sqlalchemy import text

from api.client import Client
from api.config import Settings
from api.db import SessionFactory
from api.progress import new_events
from api.schemas.records import event_number
from api.states import add_event
from tests.service.service_calls import create_job

WAIT_S = 10.0  # the most a writer may stay blocked before the test fails (it is released within seconds)
STRESS_S = 2.0  # how long the stress test's writers write


class Poller:
    """Follows one job's events as ``greentrainer jobs create --wait`` does: each poll reads the events after
    the newest one it has seen, through ``GET /v1/fine_tuning/jobs/{id}/events`` with ``after=``."""

    def __init__(self, client: TestClient, job_id: str) -> None:
        self.api = Client("http://testserver", None)
        self.api.http.close()
        self.api.http = client  # the app in this process, with the test's key
        self.job_id = job_id
        self.last: str | None = None
        self.seen: list[int] = []

    def poll(self) -> list[int]:
        """The ids of the events new since the last poll, oldest first."""
        events = new_events(self.api, self.job_id, self.last)
        if events:
            self.last = events[-1]["id"]
        ids = [event_number(e["id"]) for e in events]
        self.seen += ids
        return ids


def write_events(sessions: SessionFactory, job_id: str, n: int, pause_s: float, out: list[int]) -> None:
    """Add ``n`` events of ``job_id`` in one transaction, wait ``pause_s`` between their INSERT and the
    commit, commit; append their ids to ``out`` once committed."""
    with sessions() as session:
        events = [add_event(session, job_id, "info", f"event {i} of {n}") for i in range(n)]
        session.flush()
        time.sleep(pause_s)
        session.commit()
        out.extend(e.id for e in events)


def lock_waiters(sessions: SessionFactory, settings: Settings) -> int:
    """PostgreSQL sessions of this database waiting for a lock (0 on SQLite, which has no such view)."""
    if settings.embedded:
        return 0
    with sessions() as session:
        query = text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return session.scalar(query) or 0


def test_an_event_committed_after_a_newer_one_is_still_seen(
    client: TestClient, sessions: SessionFactory, settings: Settings
) -> None:
    job_id = create_job(client)
    poller = Poller(client, job_id)
    assert poller.poll()  # the job's own events; the poller goes on after the newest

    b_ids: list[int] = []
    b_errors: list[BaseException] = []

    def writer_b() -> None:
        try:
            write_events(sessions, job_id, 1, 0.0, b_ids)
        except BaseException as exc:  # reported by the test, not lost in the thread
            b_errors.append(exc)

    a = sessions()
    b = threading.Thread(target=writer_b, name="writer-b", daemon=True)
    try:
        a_event = add_event(a, job_id, "info", "writer A: flushed first, committed last")
        a.flush()  # A's id is taken now
        b.start()
        # B commits, or blocks on the job's row (PostgreSQL) or on the database's write lock (SQLite).
        started = time.monotonic()
        while b.is_alive() and time.monotonic() - started < WAIT_S:
            if lock_waiters(sessions, settings):  # PostgreSQL: B waits for A's lock
                break
            if settings.embedded and time.monotonic() - started > 1.0:  # SQLite's busy wait shows nowhere
                break
            time.sleep(0.05)
        b_waited = b.is_alive()
        poller.poll()  # without the lock: B's event, and the cursor moves past A's
        a.commit()
    finally:
        a.close()  # rolls A back if the test failed before its commit, which releases B
    b.join(WAIT_S)
    assert not b.is_alive(), "writer B was still blocked after writer A committed"
    assert not b_errors, b_errors
    poller.poll()

    assert a_event.id < b_ids[0]
    assert {a_event.id, b_ids[0]} <= set(poller.seen), f"poller saw {poller.seen[-3:]}"
    assert b_waited, "writer B committed while writer A held an earlier id"


def test_a_poller_sees_every_event_that_concurrent_writers_commit(
    client: TestClient, sessions: SessionFactory, settings: Settings
) -> None:
    job_id = create_job(client)
    poller = Poller(client, job_id)
    poller.poll()
    committed: list[int] = []
    errors: list[BaseException] = []
    deadline = time.monotonic() + STRESS_S

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < deadline:
                write_events(sessions, job_id, rng.randint(1, 3), rng.uniform(0.0, 0.01), committed)
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(i,), name=f"writer-{i}", daemon=True) for i in range(4)]
    for thread in writers:
        thread.start()
    polls = 0
    while any(t.is_alive() for t in writers) and time.monotonic() < deadline + WAIT_S:
        poller.poll()
        polls += 1
        time.sleep(0.01)
    for thread in writers:
        thread.join(WAIT_S)
    assert not any(t.is_alive() for t in writers), "a writer was still running"
    assert not errors, errors[:3]
    poller.poll()

    assert poller.seen == sorted(poller.seen)  # each poll's events are newer than the last poll's
    assert len(committed) > 20 and polls > 10, (len(committed), polls)
    missed = sorted(set(committed) - set(poller.seen))
    assert not missed, f"{len(missed)} of {len(committed)} committed events never seen: {missed[:10]}"
