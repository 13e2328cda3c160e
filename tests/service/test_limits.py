"""Per-tenant limits on both backends: jobs active at once (429) and the size of an upload (413), each
answered with a message that says the limit, and leaving nothing stored."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.config import Settings
from api.errors import TooManyJobs
from api.ids import new_id
from api.keys import authenticate
from api.limits import MULTIPART_OVERHEAD_BYTES, check_active_jobs
from api.tables import File, Job, Tenant
from tests.service.service_calls import (
    JOBS,
    SMALL_EXAMPLES,
    SMALL_RHO,
    dataset_lines,
    job_body,
    new_key,
    post_scope,
    upload,
)

CAP = 2
UPLOAD_LIMIT = 100_000  # bytes
BOUNDARY = "gtboundary"


def keyed(app, sessions) -> TestClient:
    return TestClient(app, headers={"Authorization": f"Bearer {new_key(sessions)}"})


def test_active_jobs_beyond_the_cap_answer_429_naming_the_limit(settings: Settings, sessions) -> None:
    app = create_app(settings.model_copy(update={"max_active_jobs": CAP}))
    client = keyed(app, sessions)
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    jobs = [client.post(JOBS, json=job_body(file_id, rho=SMALL_RHO)) for _ in range(CAP)]
    assert [r.status_code for r in jobs] == [200] * CAP

    refused = client.post(JOBS, json=job_body(file_id, rho=SMALL_RHO))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "too_many_jobs" and error["max_active_jobs"] == CAP
    assert f"GT_MAX_ACTIVE_JOBS={CAP}" in error["message"] and "cancel" in error["message"]
    assert int(refused.headers["Retry-After"]) > 0 and refused.headers["x-should-retry"] == "false"
    assert len(client.get(JOBS).json()["data"]) == CAP  # the refused one left nothing

    other = keyed(app, sessions)  # another tenant has a cap of its own
    other_file = upload(other, dataset_lines(SMALL_EXAMPLES))["id"]
    assert other.post(JOBS, json=job_body(other_file, rho=SMALL_RHO)).status_code == 200

    assert client.post(f"{JOBS}/{jobs[0].json()['id']}/cancel").json()["status"] == "cancelled"
    accepted = client.post(JOBS, json=job_body(file_id, rho=SMALL_RHO))
    assert accepted.status_code == 200 and accepted.json()["status"] == "queued"
    assert client.post(JOBS, json=job_body(file_id, rho=SMALL_RHO)).status_code == 429


def test_two_creators_at_the_cap_minus_one_cannot_both_pass(settings: Settings, sessions) -> None:
    """The first creator holds the tenant's lock until it commits; the second waits, then counts its job."""
    client = keyed(create_app(settings), sessions)
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    existing = client.post(JOBS, json=job_body(file_id, rho=SMALL_RHO)).json()["id"]
    with sessions() as first, sessions() as second:
        tenant = first.get(Tenant, first.get(File, file_id).tenant_id)
        check_active_jobs(first, tenant, CAP)  # one active of two: passes, and locks
        source = first.get(Job, existing)
        first.add(
            Job(**{c.key: getattr(source, c.key) for c in Job.__table__.columns} | {"id": new_id("ftjob")})
        )
        first.flush()
        outcome: list[BaseException | None] = []

        def second_creator() -> None:
            try:
                check_active_jobs(second, second.get(Tenant, tenant.id), CAP)
                outcome.append(None)
            except BaseException as exc:  # handed to the test's thread
                outcome.append(exc)
            finally:
                second.rollback()

        thread = threading.Thread(target=second_creator)
        thread.start()
        thread.join(timeout=1.0)
        blocked = thread.is_alive()
        first.commit()
        thread.join(timeout=60)
    assert blocked, "the second creator did not wait for the first one's commit"
    assert len(outcome) == 1 and isinstance(outcome[0], TooManyJobs), outcome


def multipart(filename: str = "train.jsonl") -> tuple[bytes, bytes]:
    """What comes before and after the file's bytes in a multipart/form-data body."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head, f"\r\n--{BOUNDARY}--\r\n".encode()


def jsonl_of(size: int) -> bytes:
    """A valid dataset of exactly ``size`` bytes (blank lines pad it)."""
    lines = dataset_lines(SMALL_EXAMPLES).encode()
    assert len(lines) <= size
    return lines + b"\n" * (size - len(lines))


@pytest.fixture
def small_uploads(settings: Settings, tmp_path: Path) -> tuple:
    """An app with a 100 kB upload limit and an artifacts folder of its own."""
    limited = settings.model_copy(
        update={"max_upload_bytes": UPLOAD_LIMIT, "artifacts_dir": tmp_path / "artifacts"}
    )
    return create_app(limited), limited


def assert_names_the_limit(response_status: int, body: dict) -> None:
    assert response_status == 413
    error = body["error"]
    assert error["code"] == "payload_too_large" and error["max_upload_bytes"] == UPLOAD_LIMIT
    assert f"{UPLOAD_LIMIT} bytes" in error["message"] and "0.1 MB" in error["message"]


def test_uploads_over_the_limit_answer_413_and_leave_nothing(small_uploads, sessions) -> None:
    app, limited = small_uploads
    client = keyed(app, sessions)
    cases = [
        ("Content-Length past the limit", UPLOAD_LIMIT + MULTIPART_OVERHEAD_BYTES + 1, False),
        ("streamed, no Content-Length, far past the limit", 3 * UPLOAD_LIMIT, True),
        (
            "streamed, no Content-Length, one byte past (inside the multipart allowance)",
            UPLOAD_LIMIT + 1,
            True,
        ),
    ]
    for name, size, streamed in cases:
        head, tail = multipart()
        body = head + jsonl_of(size) + tail
        content = (body[i : i + 8192] for i in range(0, len(body), 8192)) if streamed else body
        response = client.post(
            "/v1/files",
            content=content,
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        assert ("content-length" in response.request.headers) is not streamed, name
        assert_names_the_limit(response.status_code, response.json())
    assert client.get("/v1/files").json()["data"] == []
    assert [p for p in limited.artifacts_dir.rglob("*") if p.is_file()] == []  # no file, no temporary file

    at_limit = client.post("/v1/files", files={"file": ("train.jsonl", jsonl_of(UPLOAD_LIMIT))})
    assert at_limit.status_code == 200 and at_limit.json()["bytes"] == UPLOAD_LIMIT


def test_an_endless_upload_is_cut_off_as_it_streams_in(small_uploads, sessions) -> None:
    """Driven at the ASGI level, to count what the app read: it stops soon after the limit, not at the end."""
    app, limited = small_uploads
    key = new_key(sessions)
    head, _tail = multipart()
    chunk = json.dumps({"prompt": "What is 1 plus 1? ", "completion": "It is 2."}).encode() + b"\n"
    chunk *= 65536 // len(chunk)
    read = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal read
        body = head if read == 0 else chunk
        read += len(body)
        return {"type": "http.request", "body": body, "more_body": True}  # never ends

    async def send(message: dict) -> None:
        sent.append(message)

    scope = post_scope(
        "/v1/files",
        {
            "authorization": f"Bearer {key}",
            "content-type": f"multipart/form-data; boundary={BOUNDARY}",
            "transfer-encoding": "chunked",
        },
    )
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=60))
    assert read <= UPLOAD_LIMIT + MULTIPART_OVERHEAD_BYTES + len(chunk)
    assert_names_the_limit(sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:])))
    assert [p for p in limited.artifacts_dir.rglob("*") if p.is_file()] == []
    with sessions() as session:
        tenant = authenticate(session, key)
        assert tenant is not None
        assert session.scalars(select(File).where(File.tenant_id == tenant.id)).first() is None
