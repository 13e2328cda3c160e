"""A worker that owns 2 devices (GT_WORKER_NPROC=2; here two gloo CPU processes, through torchrun) runs each
job as 2 ranks while its own process keeps the heartbeat, cancel and every database write: the job ends where
one process ends, each epoch recorded once, and a cancel stops every rank. How the end of the ranks is read (a
report, a rank's error, a rank killed) is checked on files alone. A rank killed in a real worker:
tests/service/test_recovery.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select

from api.config import Settings
from api.tables import Checkpoint
from tests.processes import rank_processes
from tests.service.service_calls import JOBS, checkpoints, create_job
from worker.failures import error_of
from worker.ranks import REPORT_FILE, EpochFeed, RankError, RankLost, outcome_of
from worker.runner import run_job

RANKS = 2
RUN_TIMEOUT_S = 180  # every wait is bounded: a rank that hangs fails the test, never the suite


# Each launch of ranks costs seconds (torchrun, then torch imported in each rank): the runs here take the
# embedded backend, and tests/service/test_recovery.py kills a rank of a real worker on PostgreSQL and Redis
# (the worker's path to the database is the one a job in one process takes, tested on both).


@pytest.fixture(autouse=True)
def short_collective_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # The ranks inherit it (greencore.distributed): a rank left alone in a collective fails within a minute.
    monkeypatch.setenv("GT_DIST_TIMEOUT_S", "60")


def two_ranks(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"worker_nproc": RANKS, **changes})


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


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
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
    assert time.monotonic() - cancelled_at < 30  # a step is milliseconds; then the ranks exit together
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    job = client.get(f"{JOBS}/{job_id}").json()
    assert job["status"] == "cancelled" and job["epochs_done"] < 50
    assert "training stopped" in client.get(f"{JOBS}/{job_id}/events").json()["data"][0]["message"]


# torchrun's summary of a rank killed while the other one, its peer gone, failed in a collective.
KILLED = """Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 11519)
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 11520)  (SIGKILL)""".splitlines()


def test_the_end_of_the_ranks_is_read_from_their_files(tmp_path: Path) -> None:
    def error(rank: int, code: str, at: float) -> None:
        (tmp_path / f"error-{rank}.json").write_text(json.dumps({"code": code, "message": code, "time": at}))

    error(0, "training_error", 2.0)  # "Connection reset by peer": rank 1 is gone
    with pytest.raises(RankLost, match="rank 1 was killed by SIGKILL"):
        outcome_of(tmp_path, 1, KILLED)
    error(
        1, "out_of_memory", 1.0
    )  # the first error written is the cause; SIGTERM is torchrun stopping rank 0
    with pytest.raises(RankError) as raised:
        outcome_of(tmp_path, 1, ["rank      : 0 (local_rank: 0)", "exitcode  : -15 (pid: 3)"])
    assert raised.value.code == "out_of_memory"
    for path in tmp_path.glob("error-*.json"):
        path.unlink()
    with pytest.raises(RankLost, match="no error and no report"):  # ended with neither
        outcome_of(tmp_path, 1, [])
    # The job's error is the rank's, its code kept and the server's paths hidden as for one process.
    lost = RankError("out_of_memory", "CUDA out of memory writing /srv/artifacts/jobs/j/attempt-1/epoch-1")
    assert error_of(lost, artifacts_dir=Path("/srv/artifacts")) == (
        "out_of_memory",
        "CUDA out of memory writing jobs/j/attempt-1/epoch-1",
    )
    report = {"epochs": [], "final_checkpoint_dir": "f", "stopped": False, "task": "causal_lm"}
    (tmp_path / REPORT_FILE).write_text(json.dumps({**report, "method": "green", "rho": 0.5, "labels": None}))
    assert outcome_of(tmp_path, 0, []).final_checkpoint_dir == "f"


def test_each_epoch_is_handed_out_once(tmp_path: Path) -> None:
    path = tmp_path / "epochs.jsonl"
    feed = EpochFeed(path)
    assert feed.new() == []
    record = {"selected_tensors": [], "flops": {}, "rho_achieved": 0.5, "tokens": 1, "wall_s": 1.0}
    record |= {"train_loss": 1.0, "valid_loss": None, "valid_accuracy": None, "valid_token_accuracy": None}
    record |= {"energy_j": 1.0, "energy_method": "estimate", "gco2e": 0.0}
    line = json.dumps({"epoch": 1, **record}) + "\n"
    path.write_text(line + line[:20])  # epoch 2 not yet whole
    assert [r.epoch for r in feed.new()] == [1]
    path.write_text(line + json.dumps({"epoch": 2, **record}) + "\n")
    assert [r.epoch for r in feed.new()] == [2] and feed.new() == []
