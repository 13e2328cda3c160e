"""Fencing and the watchdog, in one process (worker/recorder.py): once a job is no longer an attempt's (handed
back, claimed by another worker), every write of that attempt is refused and leaves nothing; a run with no
step for GT_STALL_TIMEOUT_S is reported stalled once. The same with real, paused and hung worker processes is
in test_recovery.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from api.config import Settings
from api.tables import Checkpoint, Epoch, Event, Job
from greencore.spec import EpochReport, TrainReport
from tests.service.service_calls import JOBS, create_job
from worker.recorder import STALE, JobRecorder, StaleAttempt
from worker.runner import run_job


def report(epoch: int, checkpoint_dir: Path | None = None) -> EpochReport:
    return EpochReport(
        epoch=epoch,
        selected_tensors=["lm_head.weight"],
        flops={"total": 10, "full": 20},
        rho_achieved=0.5,
        tokens=100,
        wall_s=1.0,
        train_loss=1.0,
        valid_loss=None,
        valid_accuracy=None,
        valid_token_accuracy=None,
        energy_j=1.0,
        energy_method="estimate",
        gco2e=0.1,
        steps=3,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
    )


def running(sessions, job_id: str, worker: str, attempts: int) -> None:
    with sessions() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status="running", worker=worker, attempts=attempts)
        )
        session.commit()


def counts(sessions, job_id: str) -> tuple[int, int, int]:
    with sessions() as session:
        return tuple(  # type: ignore[return-value]
            session.scalar(select(func.count()).select_from(table).where(table.job_id == job_id))
            for table in (Epoch, Event, Checkpoint)
        )


def test_a_taken_over_attempt_writes_nothing(client: TestClient, sessions, settings: Settings) -> None:
    job_id = create_job(client)
    running(sessions, job_id, "old:1", 1)
    old = JobRecorder(sessions, job_id, "old:1", 1, settings.artifacts_dir, 60)
    folder = settings.artifacts_dir / "jobs" / job_id / "attempt-1" / "epoch-1"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    old.on_epoch(report(1, folder))  # still its own: recorded
    assert counts(sessions, job_id)[0] == 1 and counts(sessions, job_id)[2] == 1

    # Another worker claims the job (the old one was declared lost): attempt 2 on new:2.
    running(sessions, job_id, "new:2", 2)
    before = counts(sessions, job_id)
    with pytest.raises(StaleAttempt):
        old.on_epoch(report(2, folder))
    assert old.should_stop()
    assert old.finish(TrainReport([], None, stopped=True, task="causal_lm", method="green", rho=0.5)) == STALE
    assert old.fail("training_error", "boom") == STALE
    old.on_step(2, 1, 3)
    old.sync()
    assert counts(sessions, job_id) == before  # no epoch, event or checkpoint written
    job = client.get(f"{JOBS}/{job_id}").json()
    assert job["status"] == "running" and job["attempts"] == 2 and job["error"] is None
    with sessions() as session:
        assert session.get(Job, job_id).worker == "new:2"

    # The attempt that owns it writes as before; an old attempt of the same worker name is refused too.
    new = JobRecorder(sessions, job_id, "new:2", 2, settings.artifacts_dir, 60)
    new.on_epoch(report(2))
    with pytest.raises(StaleAttempt):
        JobRecorder(sessions, job_id, "new:2", 1, settings.artifacts_dir, 60).on_epoch(report(3))
    assert new.finish(TrainReport([], None, stopped=False, task="causal_lm", method="green", rho=0.5)) == (
        "succeeded"
    )


def test_a_cancelled_job_hears_from_its_attempt(client: TestClient, sessions, settings: Settings) -> None:
    job_id = create_job(client)
    running(sessions, job_id, "me:1", 1)
    recorder = JobRecorder(sessions, job_id, "me:1", 1, settings.artifacts_dir, 60)
    assert client.post(f"{JOBS}/{job_id}/cancel").status_code == 200
    recorder.sync()
    assert recorder.should_stop()  # a cancel stops the run...
    status = recorder.finish(TrainReport([], None, stopped=True, task="causal_lm", method="green", rho=0.5))
    assert status == "cancelled"  # ...which still says where it stopped
    with sessions() as session:
        messages = session.scalars(select(Event.message).where(Event.job_id == job_id)).all()
    assert any(m.startswith("training stopped at epoch") for m in messages)


def test_each_attempt_writes_its_own_folder(client: TestClient, sessions, settings: Settings) -> None:
    job_id = create_job(client)
    running(sessions, job_id, "elsewhere:1", 1)
    with sessions() as session:  # the first attempt's worker went silent long ago
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=Job.created_at))
        session.commit()
    assert run_job(job_id, sessions, settings.model_copy(update={"heartbeat_stale_s": 0.01})) == "succeeded"
    with sessions() as session:
        paths = session.scalars(select(Checkpoint.path).where(Checkpoint.job_id == job_id)).all()
    assert paths and all(p.startswith(f"jobs/{job_id}/attempt-2/") for p in paths), paths


def test_the_watchdog_fires_once_when_no_step_comes(client: TestClient, sessions, settings: Settings) -> None:
    job_id = create_job(client)
    running(sessions, job_id, "me:1", 1)
    stalls: list[float] = []
    recorder = JobRecorder(
        sessions, job_id, "me:1", 1, settings.artifacts_dir, 0.05, stall_s=0.6, on_stall=stalls.append
    )
    recorder.start()
    try:
        deadline = time.monotonic() + 1.5  # steps keep coming: no stall
        while time.monotonic() < deadline:
            recorder.on_step(1, 1, 3)
            time.sleep(0.05)
        assert stalls == []
        time.sleep(1.5)  # no step for longer than the limit: one call, however long it lasts
        assert len(stalls) == 1 and stalls[0] > 0.6
    finally:
        recorder.stop()
