"""The API fuzzed from its own OpenAPI schema with schemathesis, in process (ASGI, no server), on both
backends: whatever a client sends, valid or not, the answer is never a 5xx, and its status, content type and
body are the ones the schema declares.

The run is bounded and reproducible: MAX_EXAMPLES cases per operation and generation mode (positive: requests
the schema allows; negative: requests it does not), derandomized, no deadline, no shrinking. Every case that
names an object is sent twice: as generated (ids that do not exist), and pointed at objects of the tenant that
do (a file, a queued job, a checkpoint with files), so that handlers get past the lookup. Jobs are only
queued: no worker runs here.

schemathesis' own pytest plugin (``schemathesis.pytest.from_fixture``) cannot run under this project's pytest
(it reads a private attribute pytest 9 removed), so the operations are walked here with its public API:
``APIOperation.as_strategy`` and ``Case.call_and_validate``.

Beside the fuzz run, a plain regression test for each 5xx it found, so that each stays fixed whatever the
fuzzer's random choices become. tests/service/test_bad_input.py covers the others found at the same time
(NUL bytes in ids, cursors and filenames, path tricks).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.config import Settings
from api.db import SessionFactory
from api.schemas.common import ErrorPublic
from tests.service.service_calls import (
    DEMO,
    JOBS,
    SMALL_EXAMPLES,
    SMALL_RHO,
    add_checkpoint,
    dataset_lines,
    job_body,
    upload,
)

MAX_EXAMPLES = 25  # per operation and generation mode: about 13 s per backend on this 2-core machine
RUN_LIMIT_S = 120  # one backend's fuzz run; far above what it takes, so only a real slowdown trips it
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@dataclass
class RealObjects:
    """Objects of the fuzzing tenant, each under the name of the path parameter that takes it."""

    file_id: str
    job_id: str
    checkpoint_id: str
    model: str = DEMO


def queued_job(client: TestClient) -> tuple[str, str]:
    """A training file and a job on it, queued (no worker takes it): (file id, job id)."""
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    created = client.post(JOBS, json=job_body(file_id, rho=SMALL_RHO))
    assert created.status_code == 200, created.text
    return file_id, created.json()["id"]


def at_existing(case: Case, real: RealObjects) -> Case | None:
    """``case`` pointed at objects that exist: its path ids, and the model, files and purpose its body names;
    None when it names none."""
    path = {name: getattr(real, name) for name in case.path_parameters or {}}
    body = case.body
    if isinstance(body, dict) and "training_file" in body:  # POST /v1/estimates, /v1/fine_tuning/jobs
        body = {**body, "model": DEMO, "training_file": real.file_id}
        if "validation_file" in body:
            body["validation_file"] = real.file_id
    elif isinstance(body, dict) and "file" in body:  # POST /v1/files
        body = {**body, "file": dataset_lines(4).encode(), "purpose": "fine-tune"}
        if "model" in body:
            body["model"] = DEMO
    if not path and body is case.body:
        return None
    return case.operation.Case(
        path_parameters=path,
        headers=case.headers,
        cookies=case.cookies,
        query=case.query,
        body=body,
        media_type=case.media_type,
    )


def fuzz(operation, mode: GenerationMode, real: RealObjects, headers: dict[str, str]) -> None:
    """Send MAX_EXAMPLES cases of ``operation`` (each also pointed at existing objects) and check every
    answer; raises what the first failure raised."""

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[
            Phase.explicit,
            Phase.generate,
        ],  # no shrinking: a failure is reported as found, in bounded time
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)
        existing = at_existing(case, real)
        if existing is not None:
            existing.call_and_validate(headers=headers, checks=CHECKS)

    run()


def test_fuzzed_requests_never_answer_5xx_and_match_the_schema(
    app,
    client: TestClient,
    key: str,
    sessions: SessionFactory,
    settings: Settings,
) -> None:
    file_id, job_id = queued_job(client)
    real = RealObjects(file_id, job_id, add_checkpoint(sessions, settings.artifacts_dir, job_id))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    failures, labels = {}, []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        # An operation without parameters or body has no invalid request to make.
        invalid = operation.body or any(operation.iter_parameters())
        for mode in list(GenerationMode) if invalid else [GenerationMode.POSITIVE]:
            try:
                fuzz(operation, mode, real, headers)
            except Exception as exc:  # every operation is fuzzed, then every failure is shown
                failures[f"{operation.label} ({mode.value})"] = exc
    elapsed = time.monotonic() - started
    assert {"POST /v1/files", f"GET {JOBS}/{{job_id}}/checkpoints/{{checkpoint_id}}/content"} <= set(labels)
    assert len(labels) >= 13, labels
    assert not failures, "\n\n".join(f"{label}:\n{exc}" for label, exc in failures.items())
    assert elapsed < RUN_LIMIT_S, f"the fuzz run took {elapsed:.0f} s"


# Regression tests: the 5xx the fuzzer found, each as a plain request.


def assert_error(response, status: int, case: object) -> dict:
    """``response`` is ``status`` with the declared error body; returns the error."""
    assert response.status_code == status, (case, response.status_code, response.text[:300])
    return ErrorPublic.model_validate(response.json()).error.model_dump()


def test_number_cursors_past_the_32_bit_columns_answer_400(client: TestClient) -> None:
    """epochs.epoch and events.id are 32-bit on PostgreSQL: a larger cursor was sent to the database (500).
    An epoch cursor is the epoch number, an event cursor the event's id (ftevent-N)."""
    _, job_id = queued_job(client)
    for path, prefix in ((f"{JOBS}/{job_id}/epochs", ""), (f"{JOBS}/{job_id}/events", "ftevent-")):
        assert client.get(path, params={"after": f"{prefix}{2**31 - 1}"}).status_code == 200
        for number in (2**31, 10**12, 2**63):
            after = f"{prefix}{number}"
            error = assert_error(client.get(path, params={"after": after}), 400, (path, after))
            assert error["param"] == "after", (path, after, error)  # OpenAI's name of the parameter


def test_api_key_with_a_nul_answers_401(app) -> None:
    """PostgreSQL refuses to compare a string holding NUL: the key's lookup failed (500)."""
    for key in ("gt-\x00", "gt-" + "a" * 9 + "\x00" + "b" * 30):
        response = TestClient(app).get("/v1/files", headers={"Authorization": f"Bearer {key}"})
        assert assert_error(response, 401, key)["code"] == "invalid_api_key"


def test_lone_surrogates_in_body_ids_answer_400(client: TestClient) -> None:
    """JSON may escape half a surrogate pair ("\\ud800"), which no database encoding can hold: the file
    lookup failed on both backends (500)."""
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    for route in ("/v1/estimates", JOBS):
        for param in ("training_file", "validation_file", "model"):
            if route == "/v1/estimates" and param == "validation_file":
                continue  # an estimate takes no validation file
            body = {**job_body(file_id, rho=SMALL_RHO), param: "file-\ud800"}
            content = json.dumps(body).encode()  # ensure_ascii escapes the surrogate as JSON allows
            response = client.post(route, content=content, headers={"Content-Type": "application/json"})
            error = assert_error(response, 400, (route, param))
            assert error["param"] == param and "not found" in error["message"]


def test_bodies_that_cannot_be_parsed_answer_the_declared_error(client: TestClient) -> None:
    """Starlette answered these itself with ``{"detail": ...}``, not the declared error body."""
    multipart = "multipart/form-data; boundary=gtboundary"
    for route, content, content_type in [
        (JOBS, b"\xb2B", "application/json"),  # not UTF-8
        ("/v1/estimates", b"\xb2B", "application/json"),
        ("/v1/files", b"--gtboundary\r\n--gtboundary--\r\n", multipart),  # a part without headers
        ("/v1/files", b"anything", "multipart/form-data"),  # no boundary
    ]:
        response = client.post(route, content=content, headers={"Content-Type": content_type})
        assert response.status_code == 400, (route, content, response.text)
        assert_error(response, response.status_code, (route, content))
