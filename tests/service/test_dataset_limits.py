"""Dataset limits on both backends: a line, the examples or the tokens of a dataset past GT_MAX_DATASET_*
answer 400 naming the line, the limit and the setting, storing nothing; dataset work runs on at most
GT_DATASET_THREADS threads at once (uploads, estimates, job creation), never on the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient

import api.routes.files
from api.app import create_app
from api.config import Settings
from api.datasets import dataset_limiter
from api.estimates import ENCODED, EncodedCache
from tests.service.service_calls import JOBS, SMALL_EXAMPLES, dataset_lines, job_body, new_key, upload

LINE_LIMIT = 1024  # bytes
EXAMPLES_LIMIT = 5


def limited(settings: Settings, tmp_path: Path, **limits: int) -> tuple[TestClient, Settings]:
    """A client of an app with these settings and an artifacts folder of its own."""
    changed = settings.model_copy(update={"artifacts_dir": tmp_path / "artifacts", **limits})
    app = create_app(changed)
    return TestClient(app), changed


def keyed(client: TestClient, sessions) -> TestClient:
    client.headers["Authorization"] = f"Bearer {new_key(sessions)}"
    return client


def assert_over_limit(response: httpx.Response, line: int, setting: str, value: int, words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_dataset" and error["line"] == line, error
    assert error[setting] == value, error
    assert error["message"].startswith(f"line {line}: ") and words in error["message"], error
    assert f"GT_{setting.upper()}={value}" in error["message"], error


def test_uploads_past_a_dataset_limit_answer_400_naming_line_limit_and_setting(
    settings: Settings, sessions, tmp_path: Path
) -> None:
    client, changed = limited(
        settings, tmp_path, max_dataset_line_bytes=LINE_LIMIT, max_dataset_examples=EXAMPLES_LIMIT
    )
    client = keyed(client, sessions)
    long_line = json.dumps({"prompt": "x" * 2048, "completion": "y"})  # 2 KiB
    response = client.post("/v1/files", files={"file": ("t.jsonl", (dataset_lines(1) + long_line).encode())})
    assert_over_limit(response, 2, "max_dataset_line_bytes", LINE_LIMIT, f"longer than {LINE_LIMIT} bytes")

    six = dataset_lines(EXAMPLES_LIMIT + 1)
    response = client.post("/v1/files", files={"file": ("t.jsonl", six.encode())})
    assert_over_limit(response, 6, "max_dataset_examples", EXAMPLES_LIMIT, f"more than {EXAMPLES_LIMIT}")

    # Tokens are counted with the demo model's tokenizer (the upload names no model).
    tokens = upload(client, dataset_lines(EXAMPLES_LIMIT))["tokens"]
    client_t, _ = limited(settings, tmp_path / "t", max_dataset_tokens=tokens - 1)
    client_t = keyed(client_t, sessions)
    response = client_t.post("/v1/files", files={"file": ("t.jsonl", dataset_lines(EXAMPLES_LIMIT).encode())})
    assert_over_limit(response, EXAMPLES_LIMIT, "max_dataset_tokens", tokens - 1, "tokens, more than")
    assert client_t.get("/v1/files").json()["data"] == []
    stored = [p.name for p in (changed.artifacts_dir / "files").rglob("*") if p.is_file()]
    assert len(stored) == 1  # the one upload within the limits; no temporary file of the refused ones


def test_estimates_and_jobs_hold_the_dataset_to_the_token_limit(
    settings: Settings, sessions, tmp_path: Path
) -> None:
    """A file uploaded under a looser limit (or counted by no tokenizer) is held to GT_MAX_DATASET_TOKENS when
    an estimate or a job tokenizes it with the model's tokenizer."""
    key = new_key(sessions)
    loose, _ = limited(settings, tmp_path)
    loose.headers["Authorization"] = f"Bearer {key}"
    file = upload(loose, dataset_lines(SMALL_EXAMPLES))
    strict, _ = limited(settings, tmp_path, max_dataset_tokens=file["tokens"] // 2)
    strict.headers["Authorization"] = f"Bearer {key}"
    for path in ("/v1/estimates", JOBS):
        response = strict.post(path, json=job_body(file["id"], rho=0.75))
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["max_dataset_tokens"] == file["tokens"] // 2 and error["line"] < SMALL_EXAMPLES, error
    assert strict.get(JOBS).json()["data"] == []


def test_the_estimate_cache_is_bounded_by_token_ids_held() -> None:
    from greencore.data import Encoded

    cache = EncodedCache()

    def dataset(n_ids: int) -> tuple[Encoded, None]:
        return Encoded("causal_lm", [[1] * n_ids], [[1] * n_ids], 0, 0), None

    first = cache.get("a", 100, lambda: dataset(30))  # 60 ids: input ids and labels
    assert cache.get("a", 100, lambda: dataset(1)) is first and cache.held_ids == 60
    cache.get("b", 100, lambda: dataset(20))  # 40 more: 100 held
    cache.get("a", 100, lambda: dataset(1))  # "a" used last: "b" goes first
    cache.get("c", 100, lambda: dataset(10))
    assert cache.held_ids == 80  # "a" and "c"
    assert cache.get("b", 100, lambda: dataset(5))[0].input_ids == [[1] * 5]  # "b" was dropped: made again
    cache.get("huge", 100, lambda: dataset(60))  # more than the whole cache: used, not kept
    assert cache.held_ids <= 100 and cache.get("huge", 100, lambda: dataset(2))[0].input_ids == [[1] * 2]
    assert ENCODED.held_ids <= Settings().estimate_cache_tokens


async def concurrently(app, key: str, bodies: list[bytes]) -> list[httpx.Response]:
    """POST each body as an upload, all at once, on one event loop (as one server process serves them)."""
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
        posts = [client.post("/v1/files", files={"file": ("t.jsonl", b)}, timeout=120) for b in bodies]
        return await asyncio.gather(*posts)


def test_at_most_gt_dataset_threads_datasets_are_validated_at_once(
    settings: Settings, sessions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = 2
    app = create_app(
        settings.model_copy(update={"artifacts_dir": tmp_path / "a", "dataset_threads": threads})
    )
    real = api.routes.files.inspect_dataset
    lock = threading.Lock()
    active, most, entered = 0, 0, 0
    first_together = threading.Barrier(threads, timeout=60)  # the first `threads` must run at once

    def counted(*args, **kwargs):
        nonlocal active, most, entered
        with lock:
            active += 1
            entered += 1
            most = max(most, active)
            first = entered <= threads
        try:
            if first:
                first_together.wait()
            return real(*args, **kwargs)  # a real dataset of 20,000 lines: a fraction of a second each
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(api.routes.files, "inspect_dataset", counted)
    body = dataset_lines(20_000).encode()
    responses = asyncio.run(concurrently(app, new_key(sessions), [body] * (threads + 1)))
    assert [r.status_code for r in responses] == [200] * (threads + 1), [r.text[:200] for r in responses]
    assert entered == threads + 1 and most == threads
    assert dataset_limiter(threads).borrowed_tokens == 0


def test_the_event_loop_answers_while_a_dataset_validates(
    settings: Settings, sessions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validation waits until a health check has answered: were it on the event loop, nothing could."""
    app = create_app(settings.model_copy(update={"artifacts_dir": tmp_path / "a"}))
    real = api.routes.files.inspect_dataset
    validating, answered = threading.Event(), threading.Event()

    def slow(*args, **kwargs):
        validating.set()
        assert answered.wait(timeout=60), "no health check answered while the dataset was validated"
        return real(*args, **kwargs)

    monkeypatch.setattr(api.routes.files, "inspect_dataset", slow)

    async def run() -> tuple[httpx.Response, httpx.Response, float]:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {new_key(sessions)}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as client:
            body = dataset_lines(50_000).encode()  # 3 MB
            posting = asyncio.create_task(client.post("/v1/files", files={"file": ("t.jsonl", body)}))
            while not validating.is_set():
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            health = await client.get("/health")
            wait_s = time.perf_counter() - start
            answered.set()
            return await posting, health, wait_s

    uploaded, health, wait_s = asyncio.run(run())
    assert health.status_code == 200 and wait_s < 5
    assert uploaded.status_code == 200 and uploaded.json()["examples"] == 50_000


def test_estimates_and_job_creation_wait_for_a_dataset_thread(settings: Settings, sessions) -> None:
    """With GT_DATASET_THREADS=1 and the one thread taken, an estimate and a job creation wait; they answer
    once it is given back."""
    app = create_app(settings.model_copy(update={"dataset_threads": 1}))
    key = new_key(sessions)
    file_id = upload(
        TestClient(app, headers={"Authorization": f"Bearer {key}"}), dataset_lines(SMALL_EXAMPLES)
    )["id"]
    limiter = dataset_limiter(1)

    async def run(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as client:
            holder = object()
            await limiter.acquire_on_behalf_of(holder)
            asking = asyncio.create_task(client.post(path, json=job_body(file_id, rho=0.75), timeout=120))
            await asyncio.sleep(1.0)
            assert not asking.done(), f"{path} ran without a dataset thread"
            limiter.release_on_behalf_of(holder)
            return await asking

    for path in ("/v1/estimates", JOBS):
        response = anyio.run(run, path)
        assert response.status_code == 200, (path, response.text)
    assert limiter.borrowed_tokens == 0
