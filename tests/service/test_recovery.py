"""No job lost: real Celery worker processes killed with SIGKILL, a broker that forgets its messages, workers
that go silent. The database is the truth, and api/recovery.py makes the broker and the workers agree with it.

Every test here has a database and a broker of its own (a new PostgreSQL database and Redis prefix, or a new
embedded folder): the workers it starts recover every job they find, and must find only this test's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select, update

from api.app import create_app
from api.config import Settings
from api.db import SessionFactory, make_session_factory
from api.migrate import upgrade
from api.queue import JobQueue
from api.recovery import broker_job_ids, process_gone, recover
from api.tables import Checkpoint, Job, utcnow
from tests.backends import (
    REDIS_URL,
    create_pg_database,
    delete_redis_prefix,
    drop_pg_database,
    forget_broker,
    new_redis_prefix,
)
from tests.processes import clean_env, process, rank_processes
from tests.service.service_calls import (
    BACKENDS,
    JOBS,
    SMALL_RHO,
    create_job,
    dataset_lines,
    events,
    job_body,
    new_key,
    upload,
)
from worker.recorder import JobRecorder
from worker.runner import run_job

JOB_TIMEOUT_S = 240


@dataclass
class Service:
    """One backend of this test's own: settings, sessions, an API client and the environment of its
    workers."""

    settings: Settings
    sessions: SessionFactory
    client: TestClient
    env: dict[str, str]

    def create_job(self, **hp: object) -> str:
        return create_job(self.client, **hp)

    def job(self, job_id: str) -> Job:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def events(self, job_id: str) -> list[str]:
        """The messages of every event of the job, oldest first."""
        return [e["message"] for e in events(self.client, job_id)]

    def backdate(self, job_id: str) -> None:
        """Make a job look created a minute ago (recovery leaves jobs younger than ENQUEUE_GRACE_S alone)."""
        with self.sessions() as session:
            session.execute(
                update(Job).where(Job.id == job_id).values(created_at=utcnow() - timedelta(minutes=1))
            )
            session.commit()

    def wait_for(self, job_id: str, status: str, log: Path) -> Job:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.status == status:
                return job
            assert job.status in ("queued", "running"), (
                job.status,
                job.error_message,
                log.read_text()[-3000:],
            )
            time.sleep(0.2)
        raise AssertionError(
            f"job {job_id} is {self.job(job_id).status}, not {status}:\n{log.read_text()[-3000:]}"
        )


@pytest.fixture(params=BACKENDS)
def service(request: pytest.FixtureRequest, tmp_path: Path, models_dir: Path) -> Iterator[Service]:
    data = tmp_path / "data"
    env = {"GT_DATA_DIR": str(data), "GT_MODELS_DIR": str(models_dir), "GT_CANCEL_POLL_S": "0.2"}
    database = prefix = None
    if request.param == "production":
        database, prefix = create_pg_database(), new_redis_prefix()
        env |= {"GT_DATABASE_URL": database, "GT_BROKER_URL": REDIS_URL, "GT_BROKER_PREFIX": prefix}
    settings = Settings(
        data_dir=data,
        models_dir=models_dir,
        database_url=database,
        broker_url=REDIS_URL if prefix else None,
        broker_prefix=prefix or "",
        cancel_poll_s=0.2,
    )
    settings.ensure_dirs()
    assert settings.database_url is not None
    upgrade(settings.database_url)
    sessions = make_session_factory(settings)
    app = create_app(settings)
    client = TestClient(app, headers={"Authorization": f"Bearer {new_key(sessions)}"})
    try:
        yield Service(settings, sessions, client, clean_env(**env))
    finally:
        client.close()
        app.state.queue.close()
        app.state.session_factory.kw["bind"].dispose()
        sessions.kw["bind"].dispose()
        if database:
            drop_pg_database(database)
        if prefix:
            delete_redis_prefix(prefix)


def worker(service: Service, log: Path, **env: str):  # a context manager of a worker process
    """A real Celery worker (``python -m worker``, prefork pool) in its own process group; ``env``: more
    settings."""
    return process([sys.executable, "-m", "worker"], {**service.env, **env}, log)


def test_a_dead_process_not_yet_reaped_is_gone() -> None:
    """A killed worker's pool child lingers as a zombie until something reaps it: it is gone all the same."""
    host = socket.gethostname()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        assert not process_gone(f"{host}:{alive.pid}")
        alive.kill()
        deadline = time.monotonic() + 10
        while not process_gone(f"{host}:{alive.pid}"):  # dead, not reaped: this process has not waited
            assert time.monotonic() < deadline, "a killed process still reads as alive"
            time.sleep(0.01)
        assert os.path.exists(f"/proc/{alive.pid}")  # still in the process table
    finally:
        alive.kill()
        alive.wait()
    assert process_gone(f"{host}:{alive.pid}")
    assert not process_gone(f"{host}:{os.getpid()}") and not process_gone(f"elsewhere:{alive.pid}")


def test_a_killed_worker_loses_nothing(service: Service, tmp_path: Path) -> None:
    job_id = service.create_job(n_epochs=4)
    first = tmp_path / "worker-1.log"
    with worker(service, first) as proc:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:  # until the first epoch checkpoint is recorded: then kill it in the middle of epoch 2
            with service.sessions() as session:
                if session.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id)) is not None:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, first.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and its pool child, with no warning
        proc.wait()
    job = service.job(job_id)
    assert job.status == "running" and job.attempts == 1 and (job.epochs_done or 0) < 4

    # A new worker on this host finds the job's process gone, queues it again and resumes it.
    second = tmp_path / "worker-2.log"
    with worker(service, second):
        job = service.wait_for(job_id, "succeeded", second)
    assert job.attempts == 2 and job.epochs_done == 4
    epochs = service.client.get(f"{JOBS}/{job_id}/epochs").json()["data"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]  # none twice, none lost
    messages = service.events(job_id)
    assert any("is gone" in m and "queued again" in m for m in messages), messages
    assert any("attempt 2: resuming from checkpoint epoch-" in m for m in messages), messages


@pytest.mark.parametrize(
    "service", ["production"], indirect=True
)  # ranks cost seconds to launch: one backend
def test_a_rank_killed_in_a_two_rank_worker_loses_nothing(service: Service, tmp_path: Path) -> None:
    """A real worker that runs each job as 2 ranks (GT_WORKER_NPROC=2, gloo): rank 1 SIGKILLed once epoch 1 is
    recorded; the worker hands the job back as for a lost worker and takes it again in a fresh pool child,
    which resumes it from epoch-1 to the weights of an unbroken one-process run, epochs 1 to 4 once each."""
    job_id = service.create_job(n_epochs=4)  # epochs 2 to 4 leave time to kill a rank
    log = tmp_path / "worker.log"
    with worker(service, log, GT_WORKER_NPROC="2", GT_DIST_TIMEOUT_S="60") as proc:
        wait_until(lambda: service.job(job_id).epochs_done >= 1, log)
        ranks = rank_processes(proc.pid)
        assert len(ranks) == 2, log.read_text()[-3000:]
        next(p for p in ranks if p.environ().get("RANK") == "1").kill()
        job = service.wait_for(job_id, "succeeded", log)
    assert job.attempts == 2 and job.world_size == 2 and job.epochs_done == 4
    epochs = service.client.get(f"{JOBS}/{job_id}/epochs").json()["data"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]  # none twice, none lost
    assert all(e["world_size"] == 2 for e in epochs)
    messages = service.events(job_id)
    assert any("rank 1 was killed by SIGKILL" in m and "queued again" in m for m in messages), messages
    assert any("attempt 2: resuming from checkpoint epoch-" in m for m in messages), messages

    unbroken = service.create_job(n_epochs=4)
    assert run_job(unbroken, service.sessions, service.settings) == "succeeded"
    same = service.client.get(f"{JOBS}/{unbroken}/epochs").json()["data"]
    assert [e["selected_tensors"] for e in epochs] == [e["selected_tensors"] for e in same]
    a, b = (final_weights(service, j) for j in (unbroken, job_id))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)


def final_weights(service: Service, job_id: str) -> dict[str, torch.Tensor]:
    with service.sessions() as session:
        folder = session.scalar(
            select(Checkpoint.path).where(Checkpoint.job_id == job_id, Checkpoint.name == "final")
        )
    return load_file(str(service.settings.artifacts_dir / folder / "model.safetensors"))


def test_jobs_the_broker_lost_are_enqueued_again_at_start(service: Service, tmp_path: Path) -> None:
    job_id = service.create_job()
    service.backdate(job_id)
    assert job_id in (broker_job_ids(service.settings) or set())
    forget_broker(service.settings)
    assert job_id not in (broker_job_ids(service.settings) or set())

    # An API process that starts sends it again...
    with TestClient(create_app(service.settings)):
        pass
    assert job_id in (broker_job_ids(service.settings) or set())

    # ...and so does a worker that starts, which then runs it.
    forget_broker(service.settings)
    log = tmp_path / "worker.log"
    with worker(service, log):
        job = service.wait_for(job_id, "succeeded", log)
    assert job.attempts == 1
    assert any("enqueued again" in line for line in log.read_text().splitlines())


def test_a_silent_running_job_is_queued_again_then_failed_after_max_attempts(service: Service) -> None:
    settings = service.settings.model_copy(update={"heartbeat_stale_s": 60.0, "max_attempts": 2})
    silent, alive = service.create_job(), service.create_job()
    with service.sessions() as session:
        old, fresh = utcnow() - timedelta(minutes=5), utcnow()
        for job_id, beat in ((silent, old), (alive, fresh)):
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status="running", worker="elsewhere:1", heartbeat_at=beat, attempts=1)
            )
        session.commit()
    forget_broker(service.settings)
    queue = JobQueue(settings)
    try:
        done = recover(service.sessions, settings, queue)
        assert done.requeued == [silent] and not done.failed and not done.reenqueued
        assert service.job(silent).status == "queued" and service.job(silent).worker is None
        assert service.job(alive).status == "running"  # its heartbeat is fresh: its worker is alive
        assert broker_job_ids(settings) in (None, {silent})
        assert any(
            "no heartbeat from worker elsewhere:1" in m
            and "GT_HEARTBEAT_STALE_S=60" in m
            and "queued again" in m
            for m in service.events(silent)
        )

        # Started twice already (GT_MAX_ATTEMPTS=2) and silent again: it ends failed, saying why.
        with service.sessions() as session:
            session.execute(
                update(Job)
                .where(Job.id == silent)
                .values(status="running", worker="elsewhere:2", heartbeat_at=old, attempts=2)
            )
            session.commit()
        done = recover(service.sessions, settings, queue)
        assert done.failed == [silent] and not done.requeued
        job = service.job(silent)
        assert job.status == "failed" and job.error_code == "worker_lost"
        assert "no heartbeat from worker elsewhere:2" in (job.error_message or "")
        assert "GT_MAX_ATTEMPTS=2" in (job.error_message or "")
        assert recover(service.sessions, settings, queue).requeued == []  # nothing left to do
    finally:
        queue.close()


def test_the_heartbeat_goes_on_between_steps_and_sees_a_cancel(service: Service) -> None:
    job_id = service.create_job()
    with service.sessions() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status="running", worker="me:1", attempts=1)
        )
        session.commit()
    recorder = JobRecorder(service.sessions, job_id, "me:1", 1, service.settings.artifacts_dir, 0.1)
    recorder.start()
    try:
        beats = set()
        deadline = time.monotonic() + 5
        while len(beats) < 4 and time.monotonic() < deadline:  # no step is taken: the thread beats alone
            beats.add(service.job(job_id).heartbeat_at)
            time.sleep(0.05)
        assert len(beats) >= 4
        assert not recorder.should_stop()
        assert service.client.post(f"{JOBS}/{job_id}/cancel").status_code == 200
        deadline = time.monotonic() + 5
        while not recorder.should_stop() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert recorder.should_stop()
    finally:
        recorder.stop()


def wait_until(what: Callable[[], bool], log: Path, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def test_a_paused_worker_that_comes_back_writes_nothing(service: Service, tmp_path: Path) -> None:
    # Worker A is paused (SIGSTOP: as if cut off) in epoch 1; B declares it lost after GT_HEARTBEAT_STALE_S,
    # takes the job and runs it; A is resumed while B runs. The job's records must be B's run alone.
    fast = {"GT_HEARTBEAT_STALE_S": "3", "GT_RECOVERY_INTERVAL_S": "1"}
    file_id = upload(service.client, dataset_lines(160))["id"]  # 80 steps an epoch: room to pause in one
    response = service.client.post(JOBS, json=job_body(file_id, n_epochs=2, rho=SMALL_RHO))
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    first, second = tmp_path / "worker-a.log", tmp_path / "worker-b.log"
    with worker(service, first, **fast) as a:
        wait_until(lambda: (service.job(job_id).current_step or 0) >= 1, first)
        os.killpg(a.pid, signal.SIGSTOP)
        try:
            assert service.job(job_id).epochs_done == 0, "epoch 1 ended before the pause"
            with worker(service, second, **fast):
                wait_until(lambda: service.job(job_id).attempts == 2, second)
                os.killpg(a.pid, signal.SIGCONT)
                job = service.wait_for(job_id, "succeeded", second)
                wait_until(lambda: "no longer" in first.read_text(), first, 60)
        finally:
            os.killpg(a.pid, signal.SIGCONT)
    assert job.attempts == 2
    epochs = service.client.get(f"{JOBS}/{job_id}/epochs").json()["data"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    with service.sessions() as session:
        paths = session.scalars(select(Checkpoint.path).where(Checkpoint.job_id == job_id)).all()
    assert sorted(paths) == [f"jobs/{job_id}/attempt-2/{n}" for n in ("epoch-1", "epoch-2", "final")]
    messages = service.events(job_id)
    assert not any(m.startswith("training stopped") for m in messages), messages  # A's finish was refused
    assert messages[-1] == "job succeeded"


def test_a_hung_step_is_caught_by_the_watchdog(service: Service, tmp_path: Path) -> None:
    # Every training step after the third hangs (tests/faults/sitecustomize.py) while the heartbeat goes on:
    # the watchdog hands the job back once, then fails it `stalled` (GT_MAX_ATTEMPTS=2).
    job_id = service.create_job()
    log = tmp_path / "worker.log"
    faults = str(Path(__file__).parents[1] / "faults")
    hang = {"GT_STALL_TIMEOUT_S": "8", "GT_MAX_ATTEMPTS": "2", "GT_TEST_HANG_AFTER_STEPS": "3"}
    with worker(service, log, PYTHONPATH=faults, **hang):
        job = service.wait_for(job_id, "failed", log)
    assert job.error_code == "stalled" and job.attempts == 2, (job.error_code, job.error_message)
    assert "no training step completed for" in (job.error_message or "")
    assert job.current_step == 3  # progress stopped where the step hung
    messages = service.events(job_id)
    assert sum("no training step completed for" in m and "queued again" in m for m in messages) == 1, messages
