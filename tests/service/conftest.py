"""Service fixtures: the same tests run on the embedded default (SQLite + kombu's SQLAlchemy transport) and on
production's components (the real PostgreSQL and Redis of this machine; nothing mocked).

PostgreSQL: a fresh database ``gt_test_<random>`` per test session, migrated with ``alembic upgrade head``,
dropped at the end. Redis: every key under a random prefix, deleted at the end.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.config import Settings
from api.db import SessionFactory, make_session_factory
from api.keys import create_key
from api.migrate import upgrade
from tests.backends import (  # re-exported to the service tests
    REDIS_URL,
    create_pg_database,
    delete_redis_prefix,
    drop_pg_database,
    new_redis_prefix,
)

DEMO = "demo-tiny"
BACKENDS = ("embedded", "production")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="session")
def redis_prefix() -> Iterator[str]:
    prefix = new_redis_prefix()
    yield prefix
    delete_redis_prefix(prefix)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GT_MODELS_DIR holding the demo model (greencore.demo), built once per session."""
    from greencore.demo import make_demo_model

    folder = tmp_path_factory.mktemp("models")
    make_demo_model(folder / DEMO)
    return folder


def backend_settings(kind: str, data_dir: Path, models_dir: Path, request: pytest.FixtureRequest) -> Settings:
    if kind == "embedded":
        return Settings(data_dir=data_dir, models_dir=models_dir)
    return Settings(
        data_dir=data_dir,
        models_dir=models_dir,
        database_url=request.getfixturevalue("pg_url"),
        broker_url=REDIS_URL,
        broker_prefix=request.getfixturevalue("redis_prefix"),
    )


@pytest.fixture(scope="session", params=BACKENDS)
def settings(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Settings:
    """Settings of one backend, its database migrated to head."""
    s = backend_settings(request.param, tmp_path_factory.mktemp(request.param), models_dir, request)
    s.ensure_dirs()
    assert s.database_url is not None
    upgrade(s.database_url)
    return s


@pytest.fixture(scope="session")
def sessions(settings: Settings) -> SessionFactory:
    return make_session_factory(settings)


@pytest.fixture(scope="session")
def app(settings: Settings):  # a FastAPI app
    return create_app(settings)


def new_key(sessions: SessionFactory, tenant: str | None = None) -> str:
    with sessions() as session:
        return create_key(session, tenant or f"tenant-{secrets.token_hex(4)}")


@pytest.fixture
def key(sessions: SessionFactory) -> str:
    """A key of a tenant of its own: tests never see each other's objects."""
    return new_key(sessions)


@pytest.fixture
def client(app, key: str) -> TestClient:
    return TestClient(app, headers={"Authorization": f"Bearer {key}"})


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


# A green job small enough for a CPU test: 24 examples in batches of 2 (12 steps, so that the importance
# passes leave room in the budget), 2 epochs.
SMALL_HP = {"n_epochs": 2, "batch_size": 2, "max_seq_len": 32, "learning_rate": 1e-3}
SMALL_EXAMPLES = 24
SMALL_RHO = 0.75


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
