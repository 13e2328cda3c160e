"""The worker's plain function ``run_job`` on both backends, without a broker: records written as the run
goes, the budget kept, cancellation within a step, failures ending ``failed``, and resuming after a killed
worker."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.config import Settings
from api.states import InvalidTransition, JobState, transition
from api.tables import Checkpoint, Epoch, Job
from tests.service.service_calls import DEMO, JOBS, SMALL_HP, SMALL_RHO, checkpoints, create_job, events
from worker.runner import run_job


def test_run_job_records_epochs_events_and_checkpoints(
    client: TestClient, sessions, settings: Settings
) -> None:
    job_id = create_job(client)
    assert run_job(job_id, sessions, settings) == "succeeded"

    job = client.get(f"{JOBS}/{job_id}").json()
    tensors = next(m["tensors"] for m in client.get("/v1/models").json()["data"] if m["id"] == DEMO)
    assert job["status"] == "succeeded" and job["error"] is None and job["attempts"] == 1
    assert job["progress"]["fraction"] == 1.0 and job["epochs_done"] == SMALL_HP["n_epochs"]
    epochs = client.get(f"{JOBS}/{job_id}/epochs").json()["data"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        f = e["flops"]
        assert f["total"] <= SMALL_RHO * f["full"]  # the budget, importance passes included
        assert f["total"] == f["fwd"] + f["bwd_act"] + f["bwd_weight"] + f["selection"] and f["selection"] > 0
        assert 0 < len(e["selected_tensors"]) < tensors  # a real selection: some tensors, not all
        assert e["energy_j"] > 0 and e["energy_method"] in ("nvml", "rapl", "estimate") and e["gco2e"] > 0
        assert f["measured_step"] == f["predicted_step"] > 0
        # One process: nothing exchanged (several ranks: docs/distributed.md)
        assert (e["world_size"], e["communication_bytes"], e["communication_bytes_full"]) == (1, 0, 0)
        assert e["learning_rate"] == job["hyperparameters"]["learning_rate"]  # the rate it trained at
    # The estimate made at creation is what the run spent on full fine-tuning's side, exactly.
    assert sum(e["flops"]["full"] for e in epochs) == job["estimate"]["flops"]["full"]
    assert job["flops"]["total"] == sum(e["flops"]["total"] for e in epochs)
    assert job["flops"]["saved"] == pytest.approx(1 - job["flops"]["total"] / job["flops"]["full"])

    seen = events(client, job_id)  # oldest first
    kinds = [e["kind"] for e in seen]
    assert [e["data"]["status"] for e in seen if e["kind"] == "status"] == [
        "validating_files",
        "queued",
        "running",
        "succeeded",
    ]
    assert kinds.index("selection") < kinds.index("checkpoint") < len(kinds) - 1
    numbers = [int(e["id"].removeprefix("ftevent-")) for e in seen]
    assert numbers == sorted(numbers)
    assert client.get(f"{JOBS}/{job_id}/events").json()["data"][0]["id"] == seen[-1]["id"]  # newest first
    assert all(e["type"] == ("metrics" if e["kind"] == "epoch" else "message") for e in seen)

    saved = checkpoints(client, job_id)  # oldest first
    assert [c["name"] for c in saved] == ["epoch-1", "epoch-2", "final"]
    assert all(c["fine_tuning_job_id"] == job_id for c in saved)
    final = saved[-1]
    response = client.get(f"{JOBS}/{job_id}/checkpoints/{final['id']}/content")
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    assert int(response.headers["content-length"]) == len(response.content)
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        names = tar.getnames()
    assert f"{job_id}-final/model.safetensors" in names and f"{job_id}-final/config.json" in names
    assert not any(n.endswith("training_state.pt") for n in names)


def test_cancel_stops_a_running_job_within_a_step(client: TestClient, sessions, settings: Settings) -> None:
    fast = settings.model_copy(update={"cancel_poll_s": 0.1})
    job_id = create_job(client, n_epochs=50)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(run_job(job_id, sessions, fast)))
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until it is stepping
        job = client.get(f"{JOBS}/{job_id}").json()
        if job["progress"]["step"]:
            break
        time.sleep(0.05)
    assert client.post(f"{JOBS}/{job_id}/cancel").json()["status"] == "cancelled"
    cancelled_at = time.monotonic()
    thread.join(60)
    assert not thread.is_alive()
    assert result == ["cancelled"]
    assert (
        time.monotonic() - cancelled_at < 10
    )  # a step of this model is milliseconds; a checkpoint write less
    job = client.get(f"{JOBS}/{job_id}").json()
    assert job["status"] == "cancelled" and job["epochs_done"] < 50
    assert "training stopped" in client.get(f"{JOBS}/{job_id}/events").json()["data"][0]["message"]  # newest


def test_a_cancelled_queued_job_never_starts(client: TestClient, sessions, settings: Settings) -> None:
    job_id = create_job(client)
    client.post(f"{JOBS}/{job_id}/cancel")
    assert run_job(job_id, sessions, settings) == "cancelled"
    job = client.get(f"{JOBS}/{job_id}").json()
    assert job["attempts"] == 0 and job["started_at"] is None


def test_a_training_error_ends_the_job_failed(client: TestClient, sessions, settings: Settings) -> None:
    job_id = create_job(client)
    with sessions() as session:  # the model folder vanished from this worker's disk
        session.execute(update(Job).where(Job.id == job_id).values(model="gone-model"))
        session.commit()
    assert run_job(job_id, sessions, settings) == "failed"
    job = client.get(f"{JOBS}/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_model"
    assert "gone-model" in job["error"]["message"]
    assert client.post(f"{JOBS}/{job_id}/cancel").status_code == 409


def test_transitions_are_checked_and_race_free(client: TestClient, sessions) -> None:
    job_id = create_job(client)
    with sessions() as a, sessions() as b:
        job_a, job_b = a.get(Job, job_id), b.get(Job, job_id)
        transition(a, job_a, JobState.cancelled)
        a.commit()
        with pytest.raises(InvalidTransition):  # b still believes the job is queued: the database decides
            transition(b, job_b, JobState.running)
        assert job_b.status == "cancelled"
        with pytest.raises(InvalidTransition):
            transition(b, job_b, JobState.succeeded)


RUN_AND_WAIT = """
import sys
from api.config import Settings
from api.db import make_session_factory
from worker.runner import run_job
settings = Settings.model_validate_json(sys.argv[2])
run_job(sys.argv[1], make_session_factory(settings), settings)
"""


def test_a_killed_worker_resumes_from_its_last_checkpoint(
    client: TestClient, sessions, settings: Settings
) -> None:
    job_id = create_job(client, n_epochs=4)
    payload = settings.model_dump_json()
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_AND_WAIT, job_id, payload],
        start_new_session=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with sessions() as session:
                if session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id)) is not None:
                    break
            assert proc.poll() is None, "the worker ended before writing a checkpoint"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-epoch 2: no warning, nothing cleaned up
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status == "running" and job.attempts == 1
        done = session.scalar(select(Epoch.epoch).where(Epoch.job_id == job_id).order_by(Epoch.epoch.desc()))
    assert done is not None and done < 4

    # The broker delivers it again: the dead process was on this host, so the job is taken over at once
    # (its heartbeat is still fresh: GT_HEARTBEAT_STALE_S is 10 minutes).
    assert run_job(job_id, sessions, settings) == "succeeded"
    job = client.get(f"{JOBS}/{job_id}").json()
    assert job["attempts"] == 2 and job["status"] == "succeeded"
    epochs = client.get(f"{JOBS}/{job_id}/epochs").json()["data"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]  # none twice, none lost
    assert job["epochs_done"] == 4 and job["flops"]["total"] == sum(e["flops"]["total"] for e in epochs)
    messages = [e["message"] for e in events(client, job_id)]
    assert any(f"resuming from checkpoint epoch-{done}" in m for m in messages)
    names = [c["name"] for c in checkpoints(client, job_id)]
    assert sorted(names) == ["epoch-1", "epoch-2", "epoch-3", "epoch-4", "final"]


def test_a_running_job_with_a_fresh_heartbeat_is_not_taken_twice(
    client: TestClient, sessions, settings: Settings
) -> None:
    job_id = create_job(client)
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status="running", worker="elsewhere:1", heartbeat_at=Job.created_at, attempts=1)
        )
        session.commit()
    assert run_job(job_id, sessions, settings.model_copy(update={"heartbeat_stale_s": 3600})) == "running"
    assert client.get(f"{JOBS}/{job_id}").json()["attempts"] == 1
