"""Production's backing services on this machine, for tests and benchmarks: a PostgreSQL database and a Redis
key prefix of their own, created and removed whole."""

from __future__ import annotations

import secrets
import sqlite3

import psycopg
import redis

from api.config import Settings

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"


def pg_admin() -> psycopg.Connection:
    return psycopg.connect(PG_ADMIN, autocommit=True)


def create_pg_database() -> str:
    """A new empty PostgreSQL database; returns its SQLAlchemy URL."""
    name = f"gt_test_{secrets.token_hex(6)}"
    with pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_redis_prefix() -> str:
    return f"gt_test_{secrets.token_hex(6)}:"


def delete_redis_prefix(prefix: str) -> None:
    """Delete every key under ``prefix`` (what a Redis restarted with nothing on disk leaves of them)."""
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def forget_broker(settings: Settings) -> None:
    """Delete every message of the settings' broker, as a Redis restarted with nothing on disk (or a lost
    embedded broker file) would."""
    if settings.embedded:
        with sqlite3.connect(settings.data_dir / "broker.db", timeout=30) as conn:
            conn.execute("DELETE FROM kombu_message")
    else:
        delete_redis_prefix(settings.broker_prefix)
