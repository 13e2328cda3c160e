"""What the service tests share besides fixtures: the backends they run on, the demo model's name, the small
green job's hyperparameters, and the API calls that make a key, a dataset, an upload and a job."""

from __future__ import annotations

import json
import secrets

from fastapi.testclient import TestClient

from api.db import SessionFactory
from api.keys import create_key

DEMO = "demo-tiny"
BACKENDS = ("embedded", "production")

# A green job small enough for a CPU test: 24 examples in batches of 2 (12 steps, so that the importance
# passes leave room in the budget), 2 epochs.
SMALL_HP = {"n_epochs": 2, "batch_size": 2, "max_seq_len": 32, "learning_rate": 1e-3}
SMALL_EXAMPLES = 24
SMALL_RHO = 0.75


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


def create_job(client: TestClient, **hp: object) -> str:
    """A small green job (SMALL_HP, SMALL_RHO; ``hp`` overrides) on a new upload; returns its id."""
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    body = {
        "model": DEMO,
        "training_file": file_id,
        "method": "green",
        "hyperparameters": {**SMALL_HP, "rho": SMALL_RHO, **hp},
    }
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]
