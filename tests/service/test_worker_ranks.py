"""A worker that owns 2 devices (GT_WORKER_NPROC=2; here two gloo CPU processes, through torchrun) runs each
job as 2 ranks while its own process keeps the heartbeat, cancel and every database write: the job ends where
one process ends, a cancel stops every rank, and a rank killed mid-run hands the job back to resume from its
last epoch, nothing recorded twice."""

from __future__ import annotations

import threading
import time

import psutil
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select

from api.config import Settings
from api.tables import Checkpoint, Job
from tests.service.service_calls import JOBS, checkpoints, create_job, events
from worker.runner import run_job

RANKS = 2
RUN_TIMEOUT_S = 180  # every wait is bounded: a rank that hangs fails the test, never the suite


@pytest.fixture(autouse=True)
def short_collective_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # The ranks inherit it (greencore.distributed): a rank left alone in a collective fails within a minute.
    monkeypatch.setenv("GT_DIST_TIMEOUT_S", "60")


def two_ranks(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"worker_nproc": RANKS, **changes})


def rank_processes() -> list[psutil.Process]:
    """This test's rank processes (``python -m worker.ranks``), torchrun's children."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "worker.ranks" in proc.cmdline() and "torch.distributed.run" not in proc.cmdline():
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def in_thread(job_id: str, sessions, settings: Settings) -> tuple[threading.Thread, list[str]]:
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(run_job(job_id, sessions, settings)))
    thread.start()
    return thread, result


def final_weights(sessions, settings: Settings, job_id: str) -> dict[str, torch.Tensor]:
    with sessions() as session:
        path = session.scalar(
            select(Checkpoint.path).where(Checkpoint.job_id == job_id, Checkpoint.name == "final")
        )
    return load_file(str(settings.artifacts_dir / path / "model.safetensors"))


def test_a_job_on_two_ranks_ends_where_one_process_ends(
    client: TestClient, sessions, settings: Settings
) -> None:
    one = create_job(client)
    assert run_job(one, sessions, settings) == "succeeded"
    two = create_job(client)
    started = time.monotonic()
    assert run_job(two, sessions, two_ranks(settings)) == "succeeded"
    assert time.monotonic() - started < RUN_TIMEOUT_S
    assert rank_processes() == []

    job = client.get(f"{JOBS}/{two}").json()
    a, b = (client.get(f"{JOBS}/{j}/epochs").json()["data"] for j in (one, two))
    assert [e["epoch"] for e in b] == [1, 2]  # each epoch once
    assert [e["selected_tensors"] for e in b] == [e["selected_tensors"] for e in a]
    assert [e["flops"] for e in b] == [e["flops"] for e in a]
    for e1, e2 in zip(a, b, strict=True):
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-5)
        assert e2["world_size"] == RANKS and e2["communication_bytes"] > 0
        assert e2["communication_bytes"] < e2["communication_bytes_full"]  # green moves less than full
    assert job["status"] == "succeeded" and job["attempts"] == 1 and job["world_size"] == RANKS
    assert job["progress"]["fraction"] == 1.0 and job["flops"]["total"] == sum(e["flops"]["total"] for e in b)
    assert job["communication_bytes"] == sum(e["communication_bytes"] for e in b)
    assert job["communication_bytes_full"] == sum(e["communication_bytes_full"] for e in b)
    single = client.get(f"{JOBS}/{one}").json()
    assert (single["world_size"], single["communication_bytes"]) == (1, 0)
    assert [c["name"] for c in checkpoints(client, two)] == ["epoch-1", "epoch-2", "final"]
    wa, wb = final_weights(sessions, settings, one), final_weights(sessions, settings, two)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-5)
    # The ranks' files are gone; the attempt's folder holds the checkpoints only.
    assert not any((settings.artifacts_dir / "jobs" / two).glob("attempt-*/.ranks"))


# Each launch of ranks costs seconds (torchrun, then torch imported in each rank): the runs below, whose path
# through the worker does not depend on the backend, run on one each.
@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
def test_cancel_stops_every_rank(client: TestClient, sessions, settings: Settings) -> None:
    job_id = create_job(client, n_epochs=50)
    thread, result = in_thread(job_id, sessions, two_ranks(settings, cancel_poll_s=0.1))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not client.get(f"{JOBS}/{job_id}").json()["progress"]["step"]:  # the ranks are stepping
        assert thread.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.1)
    ranks = rank_processes()
    assert len(ranks) == RANKS
    assert client.post(f"{JOBS}/{job_id}/cancel").json()["status"] == "cancelled"
    cancelled_at = time.monotonic()
    thread.join(60)
    assert not thread.is_alive() and result == ["cancelled"]
    assert time.monotonic() - cancelled_at < 20  # a step is milliseconds; the ranks leave together
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    job = client.get(f"{JOBS}/{job_id}").json()
    assert job["status"] == "cancelled" and job["epochs_done"] < 50
    assert "training stopped" in client.get(f"{JOBS}/{job_id}/events").json()["data"][0]["message"]


@pytest.mark.parametrize("settings", ["production"], indirect=True)
def test_a_killed_rank_hands_the_job_back_and_it_resumes(
    client: TestClient, sessions, settings: Settings
) -> None:
    """Rank 1 SIGKILLed once epoch 1 is recorded: the worker stops the other rank, hands the job back as for a
    lost worker, and the next run resumes from epoch 1 and ends where an unbroken one-process run ends."""
    job_id = create_job(client, n_epochs=4)  # epochs 2 to 4 leave time to kill a rank
    thread, result = in_thread(job_id, sessions, two_ranks(settings))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        with sessions() as session:
            if session.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id)) is not None:
                break
        assert thread.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.05)
    ranks = rank_processes()
    assert len(ranks) == RANKS
    victim = next(p for p in ranks if p.environ().get("RANK") == "1")
    victim.kill()
    thread.join(90)
    assert not thread.is_alive() and result == ["queued"]
    assert rank_processes() == []
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status == "queued" and job.attempts == 1 and job.worker is None
    messages = [e["message"] for e in events(client, job_id)]
    assert any("rank 1 was killed by SIGKILL" in m and "queued again" in m for m in messages), messages

    # The broker delivers it again (here: run_job called as the task would be): it resumes and finishes.
    assert run_job(job_id, sessions, two_ranks(settings)) == "succeeded"
    job = client.get(f"{JOBS}/{job_id}").json()
    assert job["attempts"] == 2 and job["world_size"] == RANKS
    epochs = client.get(f"{JOBS}/{job_id}/epochs").json()["data"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]  # none twice, none lost
    messages = [e["message"] for e in events(client, job_id)]
    assert any("attempt 2: resuming from checkpoint epoch-" in m for m in messages), messages

    unbroken = create_job(client, n_epochs=4)
    assert run_job(unbroken, sessions, settings) == "succeeded"
    same = client.get(f"{JOBS}/{unbroken}/epochs").json()["data"]
    assert [e["selected_tensors"] for e in epochs] == [e["selected_tensors"] for e in same]
    wa, wb = final_weights(sessions, settings, unbroken), final_weights(sessions, settings, job_id)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-5)
