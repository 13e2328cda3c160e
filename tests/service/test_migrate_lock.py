"""Migrations under a lock: replicas that migrate at the same time on PostgreSQL take turns (a session-level
advisory lock on Alembic's own connection), so each succeeds and the database ends at head once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from api.migrate import MIGRATION_LOCK_KEY, alembic_config, downgrade, upgrade
from tests.backends import create_pg_database, drop_pg_database

HEAD = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


def _versions(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if "alembic_version" not in inspect(conn).get_table_names():
                return []
            return [row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))]
    finally:
        engine.dispose()


def _in_thread(target, *args) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target(*args)
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def _psycopg_dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _upgrade_together(barrier: threading.Barrier, url: str) -> None:
    barrier.wait(timeout=30)  # all at once
    upgrade(url)


def test_concurrent_upgrades_both_succeed_once(pg_url: str) -> None:
    for _ in range(3):  # from an empty database each round: the race is in creating the tables
        barrier = threading.Barrier(3)
        runs = [_in_thread(_upgrade_together, barrier, pg_url) for _ in range(3)]
        for thread, _ in runs:
            thread.join(timeout=120)
            assert not thread.is_alive()
        assert [e for _, errors in runs for e in errors] == []
        assert _versions(pg_url) == [HEAD]
        downgrade(pg_url, "base")
        assert _versions(pg_url) == []


def test_an_upgrade_waits_for_the_lock(pg_url: str) -> None:
    with psycopg.connect(_psycopg_dsn(pg_url), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        thread, errors = _in_thread(upgrade, pg_url)
        thread.join(timeout=3)
        assert thread.is_alive(), errors  # blocked on the lock
        assert _versions(pg_url) == []  # and has migrated nothing yet
        holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert errors == []
    assert _versions(pg_url) == [HEAD]
    # The lock was released: another migration (a downgrade) takes it at once.
    downgrade(pg_url, "base")
    assert _versions(pg_url) == []


def test_sqlite_migrates_without_a_lock(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gt.db'}"
    upgrade(url)
    upgrade(url)
    assert _versions(url) == [HEAD]
    downgrade(url, "base")
    assert _versions(url) == []
