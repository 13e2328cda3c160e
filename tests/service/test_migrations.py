"""Alembic migrations up and down on SQLite and PostgreSQL; the migrated schema is exactly the tables'
metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from api.migrate import downgrade, upgrade
from api.tables import Base
from tests.backends import create_pg_database, drop_pg_database

TABLES = {"tenants", "api_keys", "files", "jobs", "epochs", "events", "checkpoints"}


def _state(url: str) -> tuple[set[str], list]:
    engine = create_engine(url)
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    return tables, diff


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_upgrade_downgrade_upgrade(kind: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gt.db'}" if kind == "sqlite" else create_pg_database()
    try:
        upgrade(url)
        tables, diff = _state(url)
        assert TABLES <= tables
        assert diff == []  # no table, column, index or type that the migrations do not create
        downgrade(url, "base")
        tables, _ = _state(url)
        assert tables & TABLES == set()
        upgrade(url)
        assert TABLES <= _state(url)[0]
    finally:
        if kind != "sqlite":
            drop_pg_database(url)
