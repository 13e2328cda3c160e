"""Service fixtures: the same tests run on the embedded default (SQLite + kombu's SQLAlchemy transport) and on
production's components (the real PostgreSQL and Redis of this machine; nothing mocked).

PostgreSQL: a fresh database ``gt_test_<random>`` per test session, migrated with ``alembic upgrade head``,
dropped at the end. Redis: every key under a random prefix, deleted at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.config import Settings
from api.db import SessionFactory, make_session_factory
from api.migrate import upgrade
from tests.backends import (
    REDIS_URL,
    create_pg_database,
    delete_redis_prefix,
    drop_pg_database,
    new_redis_prefix,
)
from tests.service.service_calls import BACKENDS, DEMO, new_key


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


# Every request of the suite comes from one address ("testclient"), and the fuzz run sends over a thousand a
# minute with one key: limits no test reaches keep every request going through the rate limiter's counters
# without meeting them. tests/service/test_rate_limits.py meets each limit on purpose.
UNREACHED_RATE_LIMITS = {
    f"rate_limit_{name}_per_min": 1_000_000 for name in ("key", "tenant", "estimates", "failed_auth")
}


def backend_settings(kind: str, data_dir: Path, models_dir: Path, request: pytest.FixtureRequest) -> Settings:
    if kind == "embedded":
        return Settings(data_dir=data_dir, models_dir=models_dir, **UNREACHED_RATE_LIMITS)
    return Settings(
        data_dir=data_dir,
        models_dir=models_dir,
        database_url=request.getfixturevalue("pg_url"),
        broker_url=REDIS_URL,
        broker_prefix=request.getfixturevalue("redis_prefix"),
        **UNREACHED_RATE_LIMITS,
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


@pytest.fixture
def key(sessions: SessionFactory) -> str:
    """A key of a tenant of its own: tests never see each other's objects."""
    return new_key(sessions)


@pytest.fixture
def client(app, key: str) -> TestClient:
    return TestClient(app, headers={"Authorization": f"Bearer {key}"})
