"""No memory or disk for a request without a key, on both backends: every body is limited before it is read
and before auth (GT_MAX_BODY_BYTES; an upload keeps GT_MAX_UPLOAD_BYTES), and an upload without a valid key
answers 401 before any of its body is read. Bodies are fed at the ASGI level to count what the app pulled."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.app import create_app
from api.config import Settings
from api.keys import revoke_key
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

BODY_LIMIT = 4096  # bytes: larger than any job body, smaller than the dataset uploaded below
CHUNK = 8192  # bytes per message of a streamed body
BOUNDARY = "gtboundary"
POST_ROUTES = (JOBS, "/v1/estimates", f"{JOBS}/ftjob-abc/cancel")


@pytest.fixture
def limited(settings: Settings, tmp_path: Path) -> tuple[FastAPI, Settings]:
    """An app with a 4 KiB body limit, a bootstrap key and an artifacts folder of its own."""
    own = settings.model_copy(
        update={
            "max_body_bytes": BODY_LIMIT,
            "artifacts_dir": tmp_path / "artifacts",
            "bootstrap_api_key": SecretStr("gt-" + secrets.token_hex(16) + "-bootstrap"),
        }
    )
    return create_app(own), own


def drive(app: FastAPI, path: str, headers: dict[str, str], chunks: Iterator[bytes]) -> tuple[int, dict, int]:
    """POST ``chunks`` (never ending, if the iterator does not) to ``path``; returns the status, the JSON
    answer and how many body bytes the app pulled."""
    read = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal read
        body = next(chunks, None)
        if body is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        read += len(body)
        return {"type": "http.request", "body": body, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = post_scope(path, headers)
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=60))
    start = next(m for m in sent if m["type"] == "http.response.start")
    answer = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    return start["status"], answer | {"headers": dict(start["headers"])}, read


def endless_json() -> Iterator[bytes]:
    yield b'{"model": "'
    while True:
        yield b"x" * CHUNK


def endless_upload() -> Iterator[bytes]:
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="train.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    line = json.dumps({"prompt": "What is 1 plus 1? ", "completion": "It is 2."}).encode() + b"\n"
    while True:
        yield line * (CHUNK // len(line))


def assert_names_the_body_limit(status: int, answer: dict) -> None:
    assert status == 413, answer
    error = answer["error"]
    assert error["code"] == "payload_too_large" and error["max_body_bytes"] == BODY_LIMIT
    assert f"{BODY_LIMIT} bytes" in error["message"] and "GT_MAX_BODY_BYTES" in error["message"]
    assert answer["headers"][b"x-should-retry"] == b"false"


def stored_files(settings: Settings) -> list[Path]:
    return [p for p in settings.artifacts_dir.rglob("*") if p.is_file()]


@pytest.mark.parametrize("path", POST_ROUTES)
def test_an_oversized_body_without_a_key_answers_413_unread(limited, path: str) -> None:
    app, _own = limited
    declared = {"content-type": "application/json", "content-length": str(10 * BODY_LIMIT)}
    status, answer, read = drive(app, path, declared, endless_json())
    assert_names_the_body_limit(status, answer)
    assert read == 0  # Content-Length said it: nothing was read

    streamed = {"content-type": "application/json", "transfer-encoding": "chunked"}
    status, answer, read = drive(app, path, streamed, endless_json())
    if path.endswith("/cancel"):  # a route that takes no body never reads it: auth answers first
        assert (status, read) == (401, 0)
    else:  # a route that parses its body is cut off as it streams in, before auth
        assert_names_the_body_limit(status, answer)
        assert read <= BODY_LIMIT + CHUNK


def test_an_oversized_body_with_a_key_answers_413(limited, sessions) -> None:
    app, _own = limited
    client = TestClient(app, headers={"Authorization": f"Bearer {new_key(sessions)}"})
    response = client.post(JOBS, content=b"{" + b" " * BODY_LIMIT + b"}")
    headers = {k.encode(): v.encode() for k, v in response.headers.items()}
    assert_names_the_body_limit(response.status_code, response.json() | {"headers": headers})


def test_a_small_body_without_a_key_answers_401(limited) -> None:
    app, _own = limited
    for path in POST_ROUTES:
        response = TestClient(app).post(path, json={"model": "demo-tiny", "training_file": "file-abc"})
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_an_upload_without_a_valid_key_answers_401_unread(limited, sessions) -> None:
    app, own = limited
    revoked = new_key(sessions)
    with sessions() as session:
        revoke_key(session, revoked)
    multipart = {"content-type": f"multipart/form-data; boundary={BOUNDARY}", "transfer-encoding": "chunked"}
    cases = {
        "no Authorization": {},
        "not Bearer": {"authorization": "Basic dXNlcjpwYXNz"},
        "Bearer, no key": {"authorization": "Bearer "},
        "a wrong key": {"authorization": "Bearer gt-" + secrets.token_urlsafe(32)},
        "a revoked key": {"authorization": f"Bearer {revoked}"},
    }
    for name, auth in cases.items():
        status, answer, read = drive(app, "/v1/files", multipart | auth, endless_upload())
        assert status == 401, (name, answer)
        assert answer["error"]["code"] == "invalid_api_key", name
        assert answer["headers"][b"www-authenticate"] == b"Bearer", name
        assert read == 0, (name, read)  # not a byte pulled: the form parser never ran, nothing was spooled
    assert stored_files(own) == []


def test_with_a_key_jobs_and_uploads_still_work(limited, sessions) -> None:
    app, own = limited
    client = TestClient(app, headers={"Authorization": f"Bearer {new_key(sessions)}"})
    dataset = dataset_lines(SMALL_EXAMPLES * 4)
    assert len(dataset) > BODY_LIMIT  # an upload keeps GT_MAX_UPLOAD_BYTES, not GT_MAX_BODY_BYTES
    file_id = upload(client, dataset)["id"]

    created = client.post(JOBS, json=job_body(file_id, rho=SMALL_RHO))
    assert created.status_code == 200, created.text
    body = json.dumps(job_body(file_id, rho=SMALL_RHO)).encode()
    streamed = client.post(
        JOBS,
        content=(body[i : i + 64] for i in range(0, len(body), 64)),
        headers={"Content-Type": "application/json"},
    )
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 200, streamed.text

    assert own.bootstrap_api_key is not None
    bootstrap = TestClient(
        app, headers={"Authorization": f"Bearer {own.bootstrap_api_key.get_secret_value()}"}
    )
    assert upload(bootstrap, dataset_lines(SMALL_EXAMPLES))["bytes"] > 0
