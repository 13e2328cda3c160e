"""Celery tasks: thin wrappers that take ids, open their own session and call a plain function."""

from __future__ import annotations

from functools import lru_cache

from api.config import get_settings
from api.db import SessionFactory, make_session_factory
from api.task_names import RUN_JOB
from worker.app import app
from worker.runner import run_job


@lru_cache(maxsize=1)
def _sessions() -> SessionFactory:
    # Made on first use, inside the process that runs tasks (never inherited across a fork).
    return make_session_factory(get_settings())


@app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job_task(job_id: str) -> str:
    """Run job ``job_id`` to its end; returns its final status."""
    return run_job(job_id, _sessions(), get_settings())
