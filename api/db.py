"""Engines and sessions, shared by the API and the worker."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from api.config import Settings

SessionFactory = sessionmaker[Session]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; busy_timeout waits for a lock instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, pool_size: int = 10, pooled: bool = True) -> Engine:
    """An engine for ``url`` (SQLite or PostgreSQL), configured for several threads and processes. Not
    ``pooled``: every session opens its own connection and closes it (for a process that forks children, which
    must not inherit open connections)."""
    pool: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if pooled:
        pool = {"pool_size": pool_size, "max_overflow": 2 * pool_size, "pool_pre_ping": True}
    return create_engine(url, **pool)


def make_session_factory(settings: Settings, pooled: bool = True) -> SessionFactory:
    """Sessions on the settings' database; objects stay readable after commit."""
    engine = make_engine(settings.database_url, settings.db_pool_size, pooled)
    return sessionmaker(engine, expire_on_commit=False)
