"""Peak memory known before a job starts, on both backends: the estimate shows it, job creation refuses a job
whose peak exceeds GT_DEVICE_MEMORY_BYTES (insufficient_memory, both numbers named), and a worker whose
device is too small fails the job at once with the same code."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.app import create_app
from api.config import Settings
from api.tables import Epoch
from tests.service.service_calls import (
    JOBS,
    SMALL_EXAMPLES,
    SMALL_RHO,
    create_job,
    dataset_lines,
    job_body,
    upload,
)
from worker.runner import run_job


def _estimate(client: TestClient, name: str = "green", **hp: object) -> dict:
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    response = client.post("/v1/estimates", json=job_body(file_id, name, **hp))
    assert response.status_code == 200, response.text
    return response.json()


def test_estimate_shows_peak_memory(client: TestClient) -> None:
    green = _estimate(client, rho=SMALL_RHO)
    peak, memory = green["peak_memory_bytes"], green["memory"]
    assert peak["full"] > 0 and peak["method"] > 0
    assert memory["basis"] == "bound" and memory["method"]["importance_bytes"] > 0
    assert (
        peak["method"]
        == memory["method"]["peak_bytes"]
        == max(memory["method"]["train_step_bytes"], memory["method"]["importance_bytes"])
    )
    assert memory["full"]["importance_bytes"] == 0 and peak["full"] == memory["full"]["train_step_bytes"]
    # full fine-tuning of the same batches: the same figure whichever method is asked about
    full = _estimate(client, "full")
    assert full["peak_memory_bytes"]["full"] == full["peak_memory_bytes"]["method"] == peak["full"]
    assert full["memory"]["basis"] == "exact"
    assert _estimate(client, "lora")["peak_memory_bytes"]["method"] < peak["full"]


def test_job_creation_refuses_a_job_that_does_not_fit(
    client: TestClient, settings: Settings, key: str
) -> None:
    peak = _estimate(client, rho=SMALL_RHO)["peak_memory_bytes"]["method"]
    small = settings.model_copy(update={"device_memory_bytes": peak - 1})
    limited = TestClient(create_app(small), headers={"Authorization": f"Bearer {key}"})
    file_id = upload(limited, dataset_lines(SMALL_EXAMPLES))["id"]
    response = limited.post(JOBS, json=job_body(file_id, rho=SMALL_RHO))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "insufficient_memory" and error["type"] == "invalid_request_error"
    assert error["peak_memory_bytes"] == peak and error["device_memory_bytes"] == peak - 1
    assert str(peak) in error["message"] and str(peak - 1) in error["message"]
    assert response.headers["x-should-retry"] == "false"
    assert limited.get(JOBS).json()["data"] == []  # nothing stored
    # with room for it, the same job is created
    roomy = settings.model_copy(update={"device_memory_bytes": peak})
    fits = TestClient(create_app(roomy), headers={"Authorization": f"Bearer {key}"})
    assert fits.post(JOBS, json=job_body(file_id, rho=SMALL_RHO)).status_code == 200


def test_worker_fails_a_job_its_device_cannot_hold(client: TestClient, sessions, settings: Settings) -> None:
    job_id = create_job(client)  # created without a declared device memory
    peak = client.get(f"{JOBS}/{job_id}").json()["estimate"]["peak_memory_bytes"]["method"]
    small = settings.model_copy(update={"device_memory_bytes": peak // 2, "train_device": "cpu"})
    assert run_job(job_id, sessions, small) == "failed"
    job = client.get(f"{JOBS}/{job_id}").json()
    assert job["error"]["code"] == "insufficient_memory"
    assert str(peak) in job["error"]["message"] and str(peak // 2) in job["error"]["message"]
    with sessions() as session:  # it failed before training anything
        assert session.query(Epoch).filter(Epoch.job_id == job_id).count() == 0


def _ranked(settings: Settings, key: str, nproc: int) -> TestClient:
    """The API of a service whose workers run each job on ``nproc`` ranks (GT_WORKER_NPROC)."""
    ranked = settings.model_copy(update={"worker_nproc": nproc})
    return TestClient(create_app(ranked), headers={"Authorization": f"Bearer {key}"})


def test_estimate_is_one_rank_of_the_workers(client: TestClient, settings: Settings, key: str) -> None:
    for engine in ("ddp", "fsdp"):
        one = _estimate(client, "full", distributed=engine)
        two = _estimate(_ranked(settings, key, 2), "full", distributed=engine)
        assert one["memory"]["world_size"] == 1 and two["memory"]["world_size"] == 2
        assert two["flops"] == one["flops"]  # the FLOPs are the run's, summed over ranks
        assert two["peak_memory_bytes"]["full"] != one["peak_memory_bytes"]["full"], engine


def test_worker_checks_the_peak_of_its_own_ranks(
    client: TestClient, sessions, settings: Settings, key: str
) -> None:
    job_id = create_job(client, distributed="fsdp")  # estimated for one rank (this API's GT_WORKER_NPROC)
    stored = client.get(f"{JOBS}/{job_id}").json()["estimate"]["peak_memory_bytes"]["method"]
    two = _estimate(_ranked(settings, key, 2), rho=SMALL_RHO, distributed="fsdp")["peak_memory_bytes"][
        "method"
    ]
    assert two != stored
    worker = settings.model_copy(
        update={"worker_nproc": 2, "device_memory_bytes": two - 1, "train_device": "cpu"}
    )
    assert run_job(job_id, sessions, worker) == "failed"  # before any rank starts
    error = client.get(f"{JOBS}/{job_id}").json()["error"]
    assert error["code"] == "insufficient_memory" and str(two) in error["message"], error
