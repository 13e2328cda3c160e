"""OpenAI's fine-tuning API as the official ``openai`` package sees it, on both backends: one whole job life
(upload, create with a method object, run, retrieve, list, events, checkpoints, models, a job on the
fine-tuned model, cancel, file content and delete) and the client's error classes for what users get wrong.

The client talks to the app in this process (``TestClient`` is an ``httpx.Client``) with ``max_retries=0``;
jobs run with the worker's plain ``run_job`` in a thread while the client polls, as a user's script would."""

from __future__ import annotations

import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob

from api.config import Settings
from api.db import SessionFactory
from tests.service.service_calls import DEMO, SMALL_EXAMPLES, SMALL_HP, SMALL_RHO, dataset_lines, new_key
from worker.runner import run_job

BASE_URL = "http://testserver/v1"
SUFFIX = "contract"
METADATA = {"suite": "contract", "team": "green"}
TERMINAL = ("succeeded", "failed", "cancelled")
STEPS_PER_EPOCH = SMALL_EXAMPLES // SMALL_HP["batch_size"]


def openai_client(app, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=BASE_URL, http_client=TestClient(app), max_retries=0)


@dataclass
class Tenant:
    name: str
    client: openai.OpenAI


def new_tenant(app, sessions: SessionFactory) -> Tenant:
    name = f"contract-{secrets.token_hex(4)}"
    return Tenant(name, openai_client(app, new_key(sessions, name)))


def upload(client: openai.OpenAI, text: str, name: str = "train.jsonl") -> FileObject:
    return client.files.create(file=(name, text.encode(), "application/jsonl"), purpose="fine-tune")


def green(**hp: Any) -> dict[str, Any]:
    """OpenAI's method object for a small green job (SMALL_HP, SMALL_RHO; ``hp`` overrides)."""
    return {"type": "green", "green": {"hyperparameters": {**SMALL_HP, "rho": SMALL_RHO, **hp}}}


@dataclass
class Run:
    job: FineTuningJob  # as retrieved once it ended
    statuses: list[str] = field(default_factory=list)  # every status the client saw, in order, once each


def run_to_end(
    client: openai.OpenAI, job_id: str, sessions: SessionFactory, settings: Settings, timeout_s: float = 120
) -> Run:
    """Run the job with the worker's ``run_job`` in a thread; retrieve it through the client until it ends."""
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(run_job(job_id, sessions, settings)), daemon=True)
    thread.start()
    run = Run(client.fine_tuning.jobs.retrieve(job_id), [])
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if not run.statuses or run.statuses[-1] != job.status:
            run.statuses.append(job.status)
        if job.status in TERMINAL or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    thread.join(timeout_s)
    assert not thread.is_alive(), f"run_job of {job_id} did not return"
    run.job = client.fine_tuning.jobs.retrieve(job_id)
    assert result == [run.job.status]
    return run


# --- one job's life -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def owner(app, sessions: SessionFactory) -> Tenant:
    return new_tenant(app, sessions)


@pytest.fixture(scope="module")
def training(owner: Tenant) -> FileObject:
    return upload(owner.client, dataset_lines(SMALL_EXAMPLES))


@pytest.fixture(scope="module")
def created(owner: Tenant, training: FileObject) -> FineTuningJob:
    return owner.client.fine_tuning.jobs.create(
        model=DEMO, training_file=training.id, suffix=SUFFIX, metadata=METADATA, method=green()
    )


@pytest.fixture(scope="module")
def finished(owner: Tenant, created: FineTuningJob, sessions: SessionFactory, settings: Settings) -> Run:
    return run_to_end(owner.client, created.id, sessions, settings)


def test_files_create_answers_a_processed_file(training: FileObject) -> None:
    assert (training.object, training.purpose, training.status, training.filename) == (
        "file",
        "fine-tune",
        "processed",
        "train.jsonl",
    )
    assert training.id.startswith("file-") and training.bytes == len(dataset_lines(SMALL_EXAMPLES).encode())


def test_create_with_a_method_object(created: FineTuningJob, training: FileObject) -> None:
    job = created
    assert job.object == "fine_tuning.job" and job.id.startswith("ftjob-")
    assert (job.status, job.model, job.training_file, job.validation_file) == (
        "queued",
        DEMO,
        training.id,
        None,
    )
    assert (job.suffix, job.metadata, job.seed) == (SUFFIX, METADATA, 0)
    assert job.fine_tuned_model is None and job.finished_at is None and job.error is None
    assert job.result_files == [] and job.integrations == [] and job.organization_id
    assert job.trained_tokens == 0
    method = job.to_dict()["method"]
    assert method["type"] == "green" and set(method) == {"type", "green"}
    hp = method["green"]["hyperparameters"]
    assert {k: hp[k] for k in SMALL_HP} == SMALL_HP and hp["rho"] == SMALL_RHO
    assert job.to_dict()["hyperparameters"] == hp  # resolved, the same at both places
    assert job.hyperparameters.n_epochs == SMALL_HP["n_epochs"]
    assert job.hyperparameters.batch_size == SMALL_HP["batch_size"]
    extra = job.to_dict()  # GreenTrainer's additions ride along as extra fields
    auto = extra["estimate"]["learning_rate"]["auto"]  # what learning_rate_multiplier multiplies
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(SMALL_HP["learning_rate"] / auto)
    assert extra["rho"] == SMALL_RHO and 0 < extra["rho_min"] < SMALL_RHO
    assert extra["progress"]["fraction"] == 0.0 and extra["epochs_done"] == 0


def test_the_job_runs_to_success(finished: Run, created: FineTuningJob) -> None:
    job = finished.job
    assert job.status == "succeeded" and job.error is None
    assert job.fine_tuned_model == f"ft:{DEMO}:{SUFFIX}:{created.id}"
    assert job.trained_tokens is not None and job.trained_tokens > 0
    assert job.finished_at is not None and job.finished_at >= job.created_at
    # Whatever the client happened to see on the way, it saw it in the order of the job's life.
    order = ["validating_files", "queued", "running", "succeeded"]
    assert finished.statuses[-1] == "succeeded"
    assert finished.statuses == sorted(finished.statuses, key=order.index)
    extra = job.to_dict()
    assert extra["epochs_done"] == SMALL_HP["n_epochs"] and extra["progress"]["fraction"] == 1.0
    assert 0 < extra["flops"]["total"] <= SMALL_RHO * extra["flops"]["full"]


def test_deprecated_top_level_hyperparameters_make_a_supervised_job(
    owner: Tenant, training: FileObject, sessions: SessionFactory, settings: Settings
) -> None:
    hp = {**SMALL_HP, "n_epochs": 1, "rho": SMALL_RHO}
    job = owner.client.fine_tuning.jobs.create(model=DEMO, training_file=training.id, hyperparameters=hp)
    assert job.status == "queued" and job.method is not None and job.method.type == "supervised"
    assert job.method.supervised is not None
    assert job.method.supervised.hyperparameters.n_epochs == 1
    assert job.method.supervised.hyperparameters.batch_size == SMALL_HP["batch_size"]
    assert job.to_dict()["hyperparameters"]["rho"] == SMALL_RHO
    done = run_to_end(owner.client, job.id, sessions, settings).job
    assert done.status == "succeeded" and done.fine_tuned_model == f"ft:{DEMO}::{job.id}"


def test_auto_hyperparameters_come_back_resolved(owner: Tenant, training: FileObject) -> None:
    jobs = owner.client.fine_tuning.jobs
    method = green(n_epochs="auto", learning_rate="auto")
    job = jobs.create(model=DEMO, training_file=training.id, method=method)
    # OpenAI's multiplier scales the automatic rate; "auto" for it is 1.
    halved = green(learning_rate="auto", learning_rate_multiplier=0.5)
    half = jobs.create(model=DEMO, training_file=training.id, method=halved)
    try:
        hp = job.to_dict()["hyperparameters"]
        assert isinstance(hp["n_epochs"], int) and hp["n_epochs"] >= 1
        rate = job.to_dict()["estimate"]["learning_rate"]
        assert hp["learning_rate"] == pytest.approx(rate["auto"])
        assert rate["auto"] == pytest.approx(rate["full"] * rate["scale"])
        assert rate["scale"] > 1  # green below rho 1 trains part of the network: a larger step than full's
        assert hp["learning_rate_multiplier"] == pytest.approx(1.0)
        assert half.to_dict()["hyperparameters"]["learning_rate"] == pytest.approx(rate["auto"] / 2)
        assert half.hyperparameters.learning_rate_multiplier == pytest.approx(0.5)
    finally:
        for created in (job, half):
            assert jobs.cancel(created.id).status == "cancelled"


def test_list_jobs_pages_newest_first_and_filters_by_metadata(app, sessions: SessionFactory) -> None:
    tenant = new_tenant(app, sessions)  # a tenant of its own: the list holds exactly these jobs
    jobs = tenant.client.fine_tuning.jobs
    file_id = upload(tenant.client, dataset_lines(SMALL_EXAMPLES)).id
    tags = [{"team": "a", "run": "1"}, {"team": "b", "run": "1"}, {"team": "a", "run": "2"}]
    ids = [jobs.create(model=DEMO, training_file=file_id, method=green(), metadata=t).id for t in tags]
    newest_first = ids[::-1]
    try:
        first = jobs.list(limit=2)
        assert [j.id for j in first.data] == newest_first[:2] and first.has_more
        rest = jobs.list(limit=2, after=first.data[-1].id)
        assert [j.id for j in rest.data] == newest_first[2:] and not rest.has_more
        assert [j.id for j in jobs.list(limit=1)] == newest_first  # the client's own paging, one by one
        assert all(j.object == "fine_tuning.job" for j in first.data)

        assert [j.id for j in jobs.list(metadata={"team": "a"})] == [ids[2], ids[0]]
        assert [j.id for j in jobs.list(metadata={"team": "a", "run": "1"})] == [ids[0]]
        assert [j.id for j in jobs.list(metadata={"team": "c"})] == []
        assert [j.metadata for j in jobs.list(metadata={"team": "b"})] == [tags[1]]
    finally:
        for job_id in ids:
            jobs.cancel(job_id)
    assert [j.id for j in jobs.list(extra_query={"status": "cancelled"})] == newest_first
    assert jobs.list(extra_query={"status": "queued"}).data == []


def test_events_newest_first_with_string_ids_levels_and_paging(owner: Tenant, finished: Run) -> None:
    job_id = finished.job.id
    events = owner.client.fine_tuning.jobs.list_events(job_id, limit=100)
    assert not events.has_more
    everything = events.data
    assert len(everything) > 6
    numbers = []
    for event in everything:
        assert event.object == "fine_tuning.job.event"
        assert isinstance(event.id, str) and event.id.startswith("ftevent-")
        numbers.append(int(event.id.removeprefix("ftevent-")))
        assert event.level in ("info", "warn", "error") and event.type in ("message", "metrics")
        assert event.message and event.created_at > 0
    assert numbers == sorted(numbers, reverse=True) and len(set(numbers)) == len(numbers)  # newest first
    assert everything[0].message == "job succeeded"
    kinds = [e.to_dict()["kind"] for e in everything]
    statuses = [e.data["status"] for e, k in zip(everything, kinds, strict=True) if k == "status"]
    assert statuses == ["succeeded", "running", "queued", "validating_files"]

    metrics = [e for e in everything if e.type == "metrics"]
    assert len(metrics) == SMALL_HP["n_epochs"]
    assert all(e.to_dict()["kind"] == "epoch" for e in metrics)
    assert [e.data["epoch"] for e in metrics] == [2, 1]
    assert all(0 < e.data["rho_achieved"] <= SMALL_RHO for e in metrics)

    # Pages: a page after an event holds the events before it.
    first = owner.client.fine_tuning.jobs.list_events(job_id, limit=3)
    assert first.has_more and [e.id for e in first.data] == [e.id for e in everything[:3]]
    second = owner.client.fine_tuning.jobs.list_events(job_id, limit=3, after=first.data[-1].id)
    assert [e.id for e in second.data] == [e.id for e in everything[3:6]]
    last = owner.client.fine_tuning.jobs.list_events(job_id, after=everything[-2].id)
    assert [e.id for e in last.data] == [everything[-1].id] and not last.has_more
    assert [e.id for e in owner.client.fine_tuning.jobs.list_events(job_id, limit=2)] == [
        e.id for e in everything
    ]
    default = owner.client.fine_tuning.jobs.list_events(job_id)  # OpenAI's default page: 20
    assert len(default.data) == min(20, len(everything))


def test_checkpoints_newest_first_with_steps_metrics_and_models(owner: Tenant, finished: Run) -> None:
    job = finished.job
    page = owner.client.fine_tuning.jobs.checkpoints.list(job.id)
    assert not page.has_more
    checkpoints = page.data
    names = [c.to_dict()["name"] for c in checkpoints]
    assert names == ["final", "epoch-2", "epoch-1"]
    assert [c.step_number for c in checkpoints] == [2 * STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, STEPS_PER_EPOCH]
    for c in checkpoints:
        assert c.object == "fine_tuning.job.checkpoint" and c.fine_tuning_job_id == job.id
        assert c.id.startswith("ckpt-") and c.created_at > 0
        assert c.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{c.step_number}"
        assert c.metrics.step == c.step_number
        assert c.metrics.train_loss is not None and math.isfinite(c.metrics.train_loss)
        assert c.metrics.valid_loss is None  # no validation_file
        assert c.to_dict()["bytes"] > 0
    assert [c.id for c in owner.client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)] == [
        c.id for c in checkpoints
    ]
    first = owner.client.fine_tuning.jobs.checkpoints.list(job.id, limit=2)
    assert first.has_more and [c.id for c in first.data] == [c.id for c in checkpoints[:2]]


def test_models_list_holds_the_fine_tuned_model(owner: Tenant, finished: Run, app, sessions) -> None:
    models = {m.id: m for m in owner.client.models.list()}
    assert models[DEMO].owned_by == "system" and models[DEMO].object == "model"
    assert list(models)[0] == DEMO  # base models first
    tuned = models[finished.job.fine_tuned_model]
    assert tuned.owned_by == owner.name and tuned.created >= finished.job.created_at
    assert owner.client.models.list().data[-1].id in models
    stranger = new_tenant(app, sessions)
    assert finished.job.fine_tuned_model not in [m.id for m in stranger.client.models.list()]
    # models.retrieve: a base model, the fine-tuned one, a checkpoint's; another tenant's answers 404.
    assert owner.client.models.retrieve(DEMO).owned_by == "system"
    assert owner.client.models.retrieve(tuned.id).model_dump() == tuned.model_dump()
    checkpoint = owner.client.fine_tuning.jobs.checkpoints.list(finished.job.id).data[-1]
    assert owner.client.models.retrieve(checkpoint.fine_tuned_model_checkpoint).owned_by == owner.name
    for unknown in (tuned.id, "no-such-model", "ft:demo-tiny::ftjob-01m8hk9s143v9byp61bya42k6k"):
        with pytest.raises(openai.NotFoundError):
            stranger.client.models.retrieve(unknown)


def test_a_fine_tuned_model_is_a_base_for_another_job(
    owner: Tenant, training: FileObject, finished: Run, sessions: SessionFactory, settings: Settings
) -> None:
    tuned = finished.job.fine_tuned_model
    assert tuned is not None
    second = owner.client.fine_tuning.jobs.create(
        model=tuned, training_file=training.id, method=green(n_epochs=1)
    )
    assert second.status == "queued" and second.model == tuned
    done = run_to_end(owner.client, second.id, sessions, settings).job
    assert done.status == "succeeded" and done.trained_tokens and done.trained_tokens > 0
    # The base of a model fine-tuned from a fine-tuned model is the first base.
    assert done.fine_tuned_model == f"ft:{DEMO}::{second.id}"
    assert done.fine_tuned_model in [m.id for m in owner.client.models.list()]

    # A checkpoint's model too.
    epoch_1 = owner.client.fine_tuning.jobs.checkpoints.list(finished.job.id).data[-1]
    from_checkpoint = owner.client.fine_tuning.jobs.create(
        model=epoch_1.fine_tuned_model_checkpoint, training_file=training.id, method=green(n_epochs=1)
    )
    assert from_checkpoint.model == epoch_1.fine_tuned_model_checkpoint
    assert owner.client.fine_tuning.jobs.cancel(from_checkpoint.id).status == "cancelled"


def test_cancel_a_queued_job_and_a_running_one(
    owner: Tenant, training: FileObject, sessions: SessionFactory, settings: Settings
) -> None:
    jobs = owner.client.fine_tuning.jobs
    queued = jobs.create(model=DEMO, training_file=training.id, method=green())
    cancelled = jobs.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert jobs.retrieve(queued.id).status == "cancelled"
    assert jobs.cancel(queued.id).status == "cancelled"  # again: unchanged
    assert run_job(queued.id, sessions, settings) == "cancelled"  # a cancelled job never starts

    running = jobs.create(model=DEMO, training_file=training.id, method=green(n_epochs=50))
    fast = settings.model_copy(update={"cancel_poll_s": 0.1})
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(run_job(running.id, sessions, fast)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while jobs.retrieve(running.id).to_dict()["progress"]["step"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert jobs.retrieve(running.id).status == "running"
    assert jobs.cancel(running.id).status == "cancelled"
    thread.join(60)
    assert not thread.is_alive() and result == ["cancelled"]
    job = jobs.retrieve(running.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None and job.to_dict()["epochs_done"] < 50


def test_files_content_and_delete(owner: Tenant, training: FileObject, app) -> None:
    paths = app.openapi()["paths"]
    for method, path in (("get", "/v1/files/{file_id}/content"), ("delete", "/v1/files/{file_id}")):
        if method not in paths.get(path, {}):
            pytest.skip(f"route {method.upper()} {path} is missing (the Files API's content/delete)")
    content = owner.client.files.content(training.id)
    assert content.read() == dataset_lines(SMALL_EXAMPLES).encode()

    # A file of its own (the module's training file stays for the tests after this one).
    data = upload(owner.client, dataset_lines(SMALL_EXAMPLES), "mine.jsonl")
    job = owner.client.fine_tuning.jobs.create(model=DEMO, training_file=data.id, method=green())
    with pytest.raises(openai.ConflictError) as refused:  # a queued job needs its data
        owner.client.files.delete(data.id)
    assert job.id in refused.value.body["message"] and refused.value.code == "conflict"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert owner.client.files.content(data.id).read() == dataset_lines(SMALL_EXAMPLES).encode()
    owner.client.fine_tuning.jobs.cancel(job.id)

    spare = upload(owner.client, dataset_lines(3), "spare.jsonl")
    deleted = owner.client.files.delete(spare.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (spare.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        owner.client.files.retrieve(spare.id)
    with pytest.raises(openai.NotFoundError):
        owner.client.files.content(spare.id)


# --- the client's error classes ---------------------------------------------------------------------------


def test_a_bad_key_is_an_authentication_error(app) -> None:
    bad = openai_client(app, "gt-not-a-key-not-a-key-not-a-key")
    for call in (
        bad.models.list,
        bad.fine_tuning.jobs.list,
        lambda: bad.fine_tuning.jobs.retrieve("ftjob-x"),
    ):
        with pytest.raises(openai.AuthenticationError) as refused:
            call()
        assert refused.value.status_code == 401
        assert (refused.value.code, refused.value.type) == ("invalid_api_key", "authentication_error")


def test_another_tenants_job_is_not_found(
    app, sessions: SessionFactory, owner: Tenant, finished: Run
) -> None:
    job_id = finished.job.id
    stranger = new_tenant(app, sessions)
    jobs = stranger.client.fine_tuning.jobs
    for call in (
        lambda: jobs.retrieve(job_id),
        lambda: jobs.cancel(job_id),
        lambda: jobs.list_events(job_id),
        lambda: jobs.checkpoints.list(job_id),
    ):
        with pytest.raises(openai.NotFoundError) as refused:
            call()
        assert refused.value.code == "not_found" and refused.value.type == "invalid_request_error"
    assert jobs.list().data == []
    with pytest.raises(openai.BadRequestError) as named:  # naming another tenant's things in a body: 400
        jobs.create(model=finished.job.fine_tuned_model or "", training_file=finished.job.training_file)
    assert named.value.param in ("model", "training_file")


def test_a_bad_dataset_line_is_a_bad_request_naming_it(owner: Tenant) -> None:
    text = dataset_lines(1) + '{"prompt": "What is 1 plus 1? "}\n' + dataset_lines(1, start=2)
    with pytest.raises(openai.BadRequestError) as refused:
        upload(owner.client, text, "bad.jsonl")
    error = refused.value
    assert error.status_code == 400 and error.code == "invalid_dataset"
    assert error.body["line"] == 2 and error.body["field"] == "completion"
    assert error.body["message"].startswith("line 2")


def test_a_budget_below_rho_min_is_refused(owner: Tenant, training: FileObject) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        owner.client.fine_tuning.jobs.create(model=DEMO, training_file=training.id, method=green(rho=0.01))
    error = refused.value
    assert error.code == "budget_too_small" and error.type == "invalid_request_error"
    rho_min = error.body["rho_min"]
    assert 0.01 < rho_min < SMALL_RHO
    assert "rho_min" in error.body["message"] and f"{rho_min:.4f}" in error.body["message"]


@pytest.mark.parametrize("method_type", ["dpo", "reinforcement"])
def test_an_unsupported_method_type_is_refused(owner: Tenant, training: FileObject, method_type: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        owner.client.fine_tuning.jobs.create(
            model=DEMO, training_file=training.id, method={"type": method_type}
        )
    assert refused.value.param == "method.type" and refused.value.code == "invalid_request"
    assert "method.type" in refused.value.body["message"] and method_type in refused.value.body["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"method": "green"}, "method"),  # OpenAI's method is an object
        ({"method": green(n_epochs=0)}, "method.green.hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": "two"}}, "hyperparameters.batch_size"),
        ({"method": green(rho=2)}, "method.green.hyperparameters.rho"),
        ({"method": green(), "hyperparameters": {"n_epochs": 1}}, None),  # hyperparameters twice
        ({"method": {"type": "green", "lora": {}}}, "method.lora"),
    ],
)
def test_bodies_that_do_not_validate_are_400_not_422(
    owner: Tenant, training: FileObject, body: dict[str, Any], param: str | None
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        owner.client.fine_tuning.jobs.create(model=DEMO, training_file=training.id, extra_body=body)
    assert refused.value.status_code == 400 and refused.value.code == "invalid_request"
    if param is not None:
        assert refused.value.param == param
        assert refused.value.body["message"].startswith(f"{param}: ")
    assert refused.value.response.headers["x-should-retry"] == "false"


def test_cancelling_a_finished_job_is_a_conflict_not_to_retry(owner: Tenant, finished: Run) -> None:
    with pytest.raises(openai.ConflictError) as refused:
        owner.client.fine_tuning.jobs.cancel(finished.job.id)
    error = refused.value
    assert error.status_code == 409 and error.code == "invalid_state"
    assert error.response.headers["x-should-retry"] == "false"
    assert error.body["status"] == "succeeded" and finished.job.id in error.body["message"]
    assert owner.client.fine_tuning.jobs.retrieve(finished.job.id).status == "succeeded"


def test_a_query_that_does_not_validate_is_400_naming_the_parameter(owner: Tenant, finished: Run) -> None:
    jobs = owner.client.fine_tuning.jobs
    for call, param in (
        (lambda: jobs.list_events(finished.job.id, after="not-an-event"), "after"),
        (lambda: jobs.list(limit=0), "limit"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        assert refused.value.code == "invalid_request" and refused.value.param == param
