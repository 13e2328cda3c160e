"""The HTTP API on both backends: auth, tenancy, files, models, estimates, jobs, errors, pagination."""

from __future__ import annotations

import json
import secrets

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import create_engine, inspect, text

from api.config import Settings
from api.task_names import JOBS_QUEUE
from tests.backends import REDIS_URL
from tests.service.service_calls import (
    DEMO,
    JOBS,
    SMALL_EXAMPLES,
    SMALL_HP,
    SMALL_RHO,
    dataset_lines,
    events,
    job_body,
    method,
    new_key,
    upload,
)

DESIGN_PATHS = {
    "/health",
    "/v1/files",
    "/v1/files/{file_id}",
    "/v1/models",
    "/v1/estimates",
    JOBS,
    f"{JOBS}/{{job_id}}",
    f"{JOBS}/{{job_id}}/cancel",
    f"{JOBS}/{{job_id}}/epochs",
    f"{JOBS}/{{job_id}}/events",
    f"{JOBS}/{{job_id}}/checkpoints",
    f"{JOBS}/{{job_id}}/checkpoints/{{checkpoint_id}}/content",
}


def test_health_needs_no_key_and_docs_list_every_route(app) -> None:
    anonymous = TestClient(app)
    health = anonymous.get("/health")
    assert health.json() == {"status": "ok", "database": "ok"}
    assert float(health.headers["server-timing"].split("dur=")[1]) >= 0
    assert anonymous.get("/docs").status_code == 200
    paths = set(anonymous.get("/openapi.json").json()["paths"])
    assert DESIGN_PATHS <= paths
    assert not any(p.startswith("/v1/jobs") for p in paths)  # the old paths are gone


@pytest.mark.parametrize("header", [None, "Bearer ", "Bearer gt-not-a-key-at-all-000000000000", "Basic abc"])
def test_v1_routes_need_a_valid_key(app, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = TestClient(app).get(JOBS, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_bootstrap_key_is_valid_for_tenant_default(settings: Settings) -> None:
    from api.app import create_app

    # Random first characters: a key is found by them, and earlier tests stored bootstrap keys too.
    bootstrap = "gt-" + secrets.token_hex(16) + "-bootstrap"
    app = create_app(settings.model_copy(update={"bootstrap_api_key": SecretStr(bootstrap)}))
    ok = TestClient(app, headers={"Authorization": f"Bearer {bootstrap}"}).get("/v1/files")
    assert ok.status_code == 200
    other = TestClient(create_app(settings), headers={"Authorization": f"Bearer {bootstrap}"}).get(
        "/v1/files"
    )
    assert other.status_code == 200  # stored at start: valid on every API process until revoked
    with pytest.raises(ValueError, match="at least"):
        Settings(bootstrap_api_key="short")


def test_keys_are_stored_hashed(settings: Settings, key: str) -> None:
    engine = create_engine(str(settings.database_url))
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text("SELECT prefix, key_sha256 FROM api_keys"))]
    engine.dispose()
    assert all(key not in row for row in rows)
    assert any(key.startswith(prefix) for prefix, _ in rows)


def test_upload_names_the_line_and_field_of_a_bad_dataset(client: TestClient) -> None:
    good = json.dumps({"prompt": "a", "completion": "b"})
    cases = [
        (good + "\n{not json\n", 2, None),
        (good + "\n" + json.dumps({"prompt": "a"}) + "\n", 2, "completion"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n", 1, "messages[0].role"),
        ("", None, None),
    ]
    for body, line, field in cases:
        response = client.post("/v1/files", files={"file": ("bad.jsonl", body.encode())})
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert error["code"] == "invalid_dataset"
        assert error["line"] == line and error["field"] == field
        if line:
            assert f"line {line}" in error["message"]
    assert client.get("/v1/files").json()["data"] == []  # nothing stored


def test_upload_inspect_and_paginate_files(client: TestClient) -> None:
    ids = [upload(client, dataset_lines(3 + i), f"f{i}.jsonl")["id"] for i in range(3)]
    one = client.get(f"/v1/files/{ids[0]}").json()
    assert (one["examples"], one["format"], one["tokenizer"]) == (3, "prompt_completion", DEMO)
    assert one["tokens"] > 3
    first = client.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in first["data"]] == ids[::-1][:2] and first["has_more"]
    rest = client.get("/v1/files", params={"limit": 2, "after": first["data"][-1]["id"]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and not rest["has_more"]
    assert client.get("/v1/files/file-nope").status_code == 404


def test_upload_keeps_a_non_ascii_file_name(client: TestClient) -> None:
    name = "données_日本語 (v2).jsonl"
    created = upload(client, dataset_lines(3), name)
    assert created["filename"] == name
    assert client.get(f"/v1/files/{created['id']}").json()["filename"] == name


def test_models_lists_the_demo_model(client: TestClient) -> None:
    data = client.get("/v1/models").json()["data"]
    demo = next(m for m in data if m["id"] == DEMO)
    assert demo["architecture"] == "LlamaForCausalLM"
    assert demo["object"] == "model" and demo["owned_by"] == "system" and demo["created"] > 0
    assert demo["parameters"] > 10_000 and demo["tensors"] > 10


def test_estimate_flops_time_energy_and_budget_units(settings: Settings, key: str) -> None:
    from api.app import create_app

    # A device profile no epoch ran on (the session's database holds other tests' epochs of "cpu"): time and
    # energy on the declared profile (tests/service/test_estimate_calibration.py: on measured epochs).
    settings = settings.model_copy(update={"device_name": "declared-only"})
    client = TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"})
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    body = job_body(file_id, rho=0.8)
    est = client.post("/v1/estimates", json=body).json()
    assert est["time_basis"]["basis"] == est["energy_basis"]["basis"] == "declared"
    assert est["method"] == "green"
    assert est["rho"] == 0.8 and 0.34 < est["rho_min"] < 0.8
    assert est["flops"]["method"] == int(0.8 * est["flops"]["full"])
    assert est["steps_per_epoch"] == SMALL_EXAMPLES // SMALL_HP["batch_size"]
    flops_per_s = settings.device_peak_flops * settings.device_utilization
    assert est["time_s"]["full"] == pytest.approx(est["flops"]["full"] / flops_per_s)
    assert est["energy_j"]["method"] == pytest.approx(est["time_s"]["method"] * settings.device_watts)
    assert est["gco2e"]["full"] == pytest.approx(
        est["energy_j"]["full"] / 3.6e6 * settings.carbon_intensity_g_per_kwh
    )

    full = client.post("/v1/estimates", json={**body, "method": method("full", **SMALL_HP)}).json()
    assert full["flops"]["method"] == full["flops"]["full"] == est["flops"]["full"] and full["rho"] is None

    # A whole-run budget in FLOPs or kWh is the rho it implies.
    half = 0.9 * est["flops"]["full"]
    by_flops = client.post("/v1/estimates", json=job_body(file_id, max_flops=half)).json()
    assert by_flops["rho"] == pytest.approx(0.9)
    kwh = est["energy_j"]["full"] * 0.9 / 3.6e6
    by_kwh = client.post("/v1/estimates", json=job_body(file_id, max_energy_kwh=kwh))
    assert by_kwh.json()["rho"] == pytest.approx(0.9)

    # Below the floor: refused, naming rho_min and the smallest budget in the user's units.
    small = est["minimum_budget"]["max_flops"] * 0.5
    refused = client.post("/v1/estimates", json=job_body(file_id, max_flops=small))
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "budget_too_small" and "rho_min" in error["message"]
    assert error["min_max_flops"] == pytest.approx(est["minimum_budget"]["max_flops"])


def test_estimates_of_every_method(client: TestClient) -> None:
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]

    def estimate(name: str, **hp: object) -> dict:
        response = client.post("/v1/estimates", json=job_body(file_id, name, **hp))
        assert response.status_code == 200, response.text
        assert response.json()["method"] == name
        return response.json()

    full, lora = estimate("full"), estimate("lora")
    top1, top_rho = estimate("topk", topk_layers=1), estimate("topk", rho=0.9)
    assert full["basis"] == top1["basis"] == "profile" and lora["basis"] == "approximate"
    assert lora["flops"]["full"] == top1["flops"]["full"] == full["flops"]["full"]
    assert (
        top1["flops"]["method"] < full["flops"]["method"]
        and lora["flops"]["method"] < full["flops"]["method"]
    )
    assert top_rho["rho"] == 0.9 and top_rho["basis"] == "budget" and top_rho["rho_min"] < 0.9
    # Green with its budget front-loaded: the run's FLOPs and rho_min as even; the job records the schedule.
    even, front = estimate("green", rho=0.6), estimate("green", rho=0.6, budget_schedule="front")
    assert front["flops"] == even["flops"] and front["rho_min"] == even["rho_min"]
    created = client.post(JOBS, json=job_body(file_id, "green", rho=0.6, budget_schedule="front"))
    assert created.status_code == 200, created.text
    assert created.json()["hyperparameters"]["budget_schedule"] == "front"


def test_job_below_rho_min_is_refused_naming_rho_min(client: TestClient) -> None:
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    response = client.post(JOBS, json=job_body(file_id, rho=0.2))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "budget_too_small"
    assert "rho_min" in error["message"] and error["rho_min"] > 0.2
    assert client.get(JOBS).json()["data"] == []  # nothing stored


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"model": "no-such-model"}, 400, "model 'no-such-model' not found"),
        ({"model": "../demo-tiny"}, 400, "not found"),
        ({"training_file": "file-nope"}, 400, "training_file 'file-nope' not found"),
        ({"validation_file": "file-nope"}, 400, "validation_file 'file-nope' not found"),
        ({"method": {"type": "magic"}}, 400, "method"),
        ({"method": method(rho=1.5)}, 400, "rho"),
        ({"method": method(rho=0.5, max_flops=1e12)}, 400, "one budget"),
        ({"method": method(n_epochs=0)}, 400, "n_epochs"),
        ({"method": method(learning_rat=0.1)}, 400, "learning_rat"),
        ({"method": method("full", rho=0.5)}, 400, "apply to methods green and topk"),
        ({"method": method("topk", topk_layers=1, rho=0.9)}, 400, "not both"),
        ({"method": method("full", budget_schedule="front")}, 400, "front applies to green"),
        ({"method": method(budget_schedule="back")}, 400, "budget_schedule"),
    ],
)
def test_job_creation_errors_are_clear_4xx(
    client: TestClient, change: dict, status: int, needle: str
) -> None:
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    response = client.post(JOBS, json={**job_body(file_id), **change})
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


def broker_depth(settings: Settings) -> int:
    """Messages waiting in the jobs queue of the settings' broker."""
    if str(settings.broker_url).startswith("redis"):
        client = redis.Redis.from_url(REDIS_URL)
        try:
            return int(client.llen(settings.broker_prefix + JOBS_QUEUE))
        finally:
            client.close()
    engine = create_engine(str(settings.broker_url).removeprefix("sqla+"))
    if not inspect(engine).has_table("kombu_message"):  # kombu creates its tables on first use
        return 0
    with engine.connect() as conn:
        depth = conn.execute(
            text(
                "SELECT count(*) FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
                "WHERE q.name = :name AND m.visible"
            ),
            {"name": JOBS_QUEUE},
        ).scalar_one()
    engine.dispose()
    return int(depth)


def test_job_is_committed_then_enqueued_and_can_be_cancelled(client: TestClient, settings: Settings) -> None:
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    before = broker_depth(settings)
    job = client.post(JOBS, json=job_body(file_id, rho=SMALL_RHO)).json()
    assert job["status"] == "queued" and job["rho"] == SMALL_RHO and job["rho_min"] < SMALL_RHO
    assert job["method"]["type"] == "green" and job["method"]["green"]["hyperparameters"]["rho"] == SMALL_RHO
    assert job["estimate"]["flops"]["full"] > 0 and job["progress"]["fraction"] == 0
    assert broker_depth(settings) == before + 1
    assert [e["data"]["status"] for e in events(client, job["id"])] == ["validating_files", "queued"]

    cancelled = client.post(f"{JOBS}/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert client.post(f"{JOBS}/{job['id']}/cancel").json()["status"] == "cancelled"  # idempotent
    newest = client.get(f"{JOBS}/{job['id']}/events").json()["data"][0]  # newest first
    assert newest["kind"] == "status" and newest["data"]["status"] == "cancelled"


def test_a_job_the_broker_cannot_take_stays_queued_with_a_warning(settings: Settings, key: str) -> None:
    from api.app import create_app

    # A real broker that is down: nothing listens on port 1.
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0", "broker_prefix": ""})
    client = TestClient(create_app(down), headers={"Authorization": f"Bearer {key}"})
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    response = client.post(JOBS, json=job_body(file_id, rho=SMALL_RHO))
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "queued"
    seen = events(client, job["id"])
    assert [e["data"]["status"] for e in seen if e["kind"] == "status"] == ["validating_files", "queued"]
    assert seen[-1]["level"] == "warn" and "the job stays queued" in seen[-1]["message"]
    assert client.get(f"{JOBS}/{job['id']}").json()["status"] == "queued"


def test_budget_in_flops_is_recorded_as_rho(client: TestClient) -> None:
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    est = client.post("/v1/estimates", json=job_body(file_id, rho=1.0)).json()
    budget = 0.8 * est["flops"]["full"]
    job = client.post(JOBS, json=job_body(file_id, max_flops=budget)).json()
    assert job["rho"] == pytest.approx(0.8) and job["hyperparameters"]["max_flops"] == budget
    messages = [e["message"] for e in events(client, job["id"])]
    assert any("rho=0.8000" in m for m in messages)


def test_jobs_list_paginates_and_filters_by_status(client: TestClient) -> None:
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    ids = [client.post(JOBS, json=job_body(file_id, rho=SMALL_RHO)).json()["id"] for _ in range(3)]
    client.post(f"{JOBS}/{ids[0]}/cancel")
    page = client.get(JOBS, params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get(JOBS, params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    assert [j["id"] for j in client.get(JOBS, params={"status": "cancelled"}).json()["data"]] == [ids[0]]
    assert client.get(JOBS, params={"status": "nonsense"}).status_code == 400


def test_another_tenants_objects_answer_404(app, client: TestClient, sessions) -> None:
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    job_id = client.post(JOBS, json=job_body(file_id, rho=SMALL_RHO)).json()["id"]
    other = TestClient(app, headers={"Authorization": f"Bearer {new_key(sessions)}"})
    for path in (
        f"/v1/files/{file_id}",
        f"{JOBS}/{job_id}",
        f"{JOBS}/{job_id}/epochs",
        f"{JOBS}/{job_id}/events",
        f"{JOBS}/{job_id}/checkpoints",
        f"{JOBS}/{job_id}/checkpoints/ckpt-x/content",
    ):
        assert other.get(path).status_code == 404, path
    assert other.post(f"{JOBS}/{job_id}/cancel").status_code == 404
    assert other.get(JOBS).json()["data"] == [] and other.get("/v1/files").json()["data"] == []
    refused = other.post(JOBS, json=job_body(file_id, rho=SMALL_RHO))  # naming a foreign file in a body
    assert refused.status_code == 400 and "not found" in refused.json()["error"]["message"]
    assert client.get(f"{JOBS}/{job_id}").json()["status"] == "queued"  # untouched


def test_keys_create_prints_a_working_key_as_its_last_word(app, settings: Settings) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("GT_")}
    env.update(GT_DATABASE_URL=str(settings.database_url), GT_DATA_DIR=str(settings.data_dir))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "greentrainer"), "keys", "create", "--tenant", "acme"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    key = done.stdout.split()[-1]
    assert TestClient(app, headers={"Authorization": f"Bearer {key}"}).get(JOBS).status_code == 200


def test_schemas_follow_greencore(app) -> None:
    import dataclasses

    from api.archive import RESUME_ONLY
    from api.schemas.jobs import Hyperparameters
    from greencore import checkpoint
    from greencore.registry import ALIASES, METHODS
    from greencore.spec import DEFAULT_RHO
    from greencore.spec import Hyperparameters as Core

    core = {f.name: f.default for f in dataclasses.fields(Core)}
    ours = {name: f.default for name, f in Hyperparameters.model_fields.items()}
    assert ours == {**core, "learning_rate_multiplier": None}  # every training setting, greencore's default
    schema = app.openapi()["components"]["schemas"]
    assert schema["JobMethod"]["properties"]["type"]["enum"] == [*ALIASES, *METHODS]
    assert schema["JobMethod"]["properties"]["type"]["x-default-rho"] == DEFAULT_RHO  # the dashboard's start
    n_epochs = schema["Hyperparameters"]["properties"]["n_epochs"]["anyOf"]  # a number or OpenAI's "auto"
    assert n_epochs[0]["maximum"] == 1000 and n_epochs[1]["const"] == "auto"  # greencore's bound
    assert set(RESUME_ONLY) == {checkpoint.STATE_FILE, checkpoint.MASTER_FILE}


def test_job_creations_never_hold_up_reads(app, key: str) -> None:
    """A creation may profile a new model for seconds (its estimate): creations take turns on threads of their
    own, so that with every one of them busy a job is still read at once, and the next creation waits."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from api.deps import CREATE_LIMITER

    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
        job_id = client.post(JOBS, json=job_body(file_id, rho=SMALL_RHO)).json()["id"]
        borrowers = [object() for _ in range(int(CREATE_LIMITER.total_tokens))]
        for borrower in borrowers:  # every creation thread taken, as by slow estimates
            client.portal.call(CREATE_LIMITER.acquire_on_behalf_of, borrower)
        with ThreadPoolExecutor(2) as pool:
            try:
                creating = pool.submit(client.post, JOBS, json=job_body(file_id, rho=SMALL_RHO))
                assert pool.submit(client.get, f"{JOBS}/{job_id}").result(timeout=30).status_code == 200
                time.sleep(0.5)
                assert not creating.done()  # it waits for a creation thread
            finally:
                for borrower in borrowers:
                    client.portal.call(CREATE_LIMITER.release_on_behalf_of, borrower)
            assert creating.result(timeout=60).status_code == 200


def test_a_small_dataset_selects_every_few_epochs_and_a_refusal_names_what_fits(
    client: TestClient,
) -> None:
    # 24 examples at batch 8: 3 steps an epoch, too few to pay an importance pass every epoch at rho 0.5.
    file_id = upload(client, dataset_lines(24))["id"]
    small = {"batch_size": 8, "rho": 0.5}
    est = client.post("/v1/estimates", json=job_body(file_id, n_epochs=3, **small))
    assert est.status_code == 200, est.text
    assert est.json()["reselect_every"] == 3 and est.json()["rho_min"] < 0.5  # one selection serves the run
    normal = client.post("/v1/estimates", json=job_body(file_id, rho=0.75)).json()
    assert normal["reselect_every"] == 1  # 12 steps an epoch: every epoch, as the paper

    # One epoch cannot spread the passes: refused, naming changes that fit, each with its own rho_min.
    for path in ("/v1/estimates", JOBS):
        refused = client.post(path, json=job_body(file_id, n_epochs=1, **small))
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "budget_too_small" and error["rho_min"] > 0.5
        advice = error["advice"]
        assert advice[0].startswith("n_epochs=2 (")  # one selection serving both epochs' 6 steps
        assert any(a.startswith("importance_rows=") for a in advice), advice
        assert any(a.startswith("batch_size=") for a in advice), advice
        for a in advice:
            assert a in error["message"]
            assert 0 < float(a.rsplit("rho_min ", 1)[1].rstrip(")")) <= 0.5
    assert client.get(JOBS).json()["data"] == []  # nothing stored
