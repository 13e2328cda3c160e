"""Running the Alembic migrations from code (``greentrainer migrate``, ``serve``, tests), from any folder.

Every ``greentrainer serve`` and ``greentrainer migrate`` migrates, so replicas that start together would race
(two ``CREATE TABLE``s, two version rows). On PostgreSQL the upgrade or downgrade therefore runs under a
session-level advisory lock, taken on the very connection Alembic migrates with: the others wait for it, then
find the database at the revision asked for and do nothing. SQLite needs no lock (one file, one writer).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, pool, text

import migrations

# pg_advisory_lock's key: a fixed signed 64-bit number ("GTmigrat"), the same in every process.
MIGRATION_LOCK_KEY = 0x47546D6967726174


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url`` pointing at the installed ``migrations`` package."""
    config = Config()
    # The first entry of __path__: the package folder (also when an editable install makes it a namespace).
    config.set_main_option("script_location", str(Path(next(iter(migrations.__path__)))))
    config.attributes["url"] = database_url
    return config


def _locked(database_url: str, run: Callable[[Config], None]) -> None:
    """Run ``run`` with a config whose ``connection`` holds the migration lock (on PostgreSQL) for the whole
    run. The lock is a session lock: it outlives the commits Alembic makes and ends with the connection at the
    latest, also when the process dies."""
    engine = create_engine(database_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            postgres = connection.dialect.name == "postgresql"
            if postgres:
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                connection.commit()  # Alembic begins (and commits) its own transaction
            config = alembic_config(database_url)
            config.attributes["connection"] = connection
            try:
                run(config)
            finally:
                if postgres:
                    connection.rollback()  # a failed migration leaves its transaction aborted
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                    connection.commit()
    finally:
        engine.dispose()


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (creates the tables on an empty database)."""
    _locked(database_url, lambda config: command.upgrade(config, revision))


def downgrade(database_url: str, revision: str = "base") -> None:
    """Migrate the database down to ``revision`` (``base``: no tables left)."""
    _locked(database_url, lambda config: command.downgrade(config, revision))
