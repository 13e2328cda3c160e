"""What the service tests share besides fixtures: the backends they run on, the demo model's name, the small
green job's hyperparameters, job bodies in OpenAI's shape (the method object), and the API calls that make a
key, a dataset, an upload and a job and that read a job's events and checkpoints (oldest first)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from fastapi.testclient import TestClient

from api.db import SessionFactory
from api.ids import new_id
from api.keys import create_key
from api.tables import Checkpoint, utcnow

DEMO = "demo-tiny"
BACKENDS = ("embedded", "production")

# A green job small enough for a CPU test: 24 examples in batches of 2 (12 steps, so that the importance
# passes leave room in the budget), 2 epochs.
SMALL_HP = {"n_epochs": 2, "batch_size": 2, "max_seq_len": 32, "learning_rate": 1e-3}
SMALL_EXAMPLES = 24
SMALL_RHO = 0.75

JOBS = "/v1/fine_tuning/jobs"  # OpenAI's path of the jobs


def new_key(sessions: SessionFactory, tenant: str | None = None) -> str:
    with sessions() as session:
        return create_key(session, tenant or f"tenant-{secrets.token_hex(4)}")


def dataset_lines(n: int, start: int = 0) -> str:
    """``n`` prompt/completion lines of arithmetic."""
    return "".join(
        json.dumps({"prompt": f"What is {i} plus {i}? ", "completion": f"It is {2 * i}."}) + "\n"
        for i in range(start, start + n)
    )


def upload(client: TestClient, text: str, name: str = "train.jsonl") -> dict:
    response = client.post("/v1/files", files={"file": (name, text.encode())}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()


def method(name: str = "green", **hp: object) -> dict:
    """OpenAI's method object: ``{"type": name, name: {"hyperparameters": hp}}``."""
    return {"type": name, name: {"hyperparameters": hp}}


def job_body(file_id: str, name: str = "green", **hp: object) -> dict:
    """A job (or estimate) body of the demo model on ``file_id``: method ``name`` with SMALL_HP and ``hp``."""
    return {"model": DEMO, "training_file": file_id, "method": method(name, **{**SMALL_HP, **hp})}


def create_job(client: TestClient, **hp: object) -> str:
    """A small green job (SMALL_HP, SMALL_RHO; ``hp`` overrides) on a new upload; returns its id."""
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    response = client.post(JOBS, json=job_body(file_id, **{"rho": SMALL_RHO, **hp}))
    assert response.status_code == 200, response.text
    return response.json()["id"]


def all_of(client: TestClient, path: str) -> list[dict]:
    """Every object of a newest-first list (events, checkpoints), paged with ``after``, OLDEST FIRST."""
    found: list[dict] = []
    params: dict[str, object] = {"limit": 100}
    while True:
        response = client.get(path, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        found += page["data"]
        if not page["has_more"]:
            return found[::-1]
        params["after"] = page["data"][-1]["id"]


def events(client: TestClient, job_id: str) -> list[dict]:
    """Every event of a job, oldest first (the API lists them newest first)."""
    return all_of(client, f"{JOBS}/{job_id}/events")


def checkpoints(client: TestClient, job_id: str) -> list[dict]:
    """Every checkpoint of a job, oldest first (the API lists them newest first)."""
    return all_of(client, f"{JOBS}/{job_id}/checkpoints")


def post_scope(path: str, headers: dict[str, str]) -> dict:
    """The ASGI scope of ``POST path`` with these headers: for tests that drive the app at the ASGI level
    (to count the body bytes it reads, or to cut a body short)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test"), *((k.lower().encode(), v.encode()) for k, v in headers.items())],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }


def add_checkpoint(sessions: SessionFactory, artifacts_dir: Path, job_id: str, size_bytes: int = 1000) -> str:
    """A checkpoint of ``job_id`` whose folder holds a config and a (sparse) ``size_bytes`` safetensors file,
    recorded as the worker records one; its id."""
    relative = f"checkpoints/{job_id}/epoch-1"
    folder = artifacts_dir / relative
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    with (folder / "model.safetensors").open("wb") as handle:
        handle.truncate(size_bytes)
    checkpoint_id = new_id("ckpt")
    with sessions() as session:
        session.add(
            Checkpoint(
                id=checkpoint_id,
                job_id=job_id,
                name="epoch-1",
                epoch=1,
                path=relative,
                bytes=size_bytes,
                created_at=utcnow(),
            )
        )
        session.commit()
    return checkpoint_id
