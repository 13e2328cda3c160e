"""Sending jobs to the workers: the Celery configuration both sides share, and a client that enqueues by name.

The API never imports task code: it sends ``RUN_JOB`` with a job id, after the job is committed.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from api.config import Settings
from api.task_names import JOBS_QUEUE, RUN_JOB


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings of the API's client and of the workers."""
    transport_options: dict[str, Any] = {}
    broker = str(settings.broker_url)
    if broker.startswith(("redis://", "rediss://")):
        # An unacknowledged job is delivered again after this long: longer than any job, so that a running job
        # is never handed to a second worker; a dead worker's job is found by its stale heartbeat instead.
        transport_options["visibility_timeout"] = settings.visibility_timeout_s
        if settings.broker_prefix:
            transport_options["global_keyprefix"] = settings.broker_prefix
    elif broker.startswith(("sqla+sqlite", "sqlalchemy+sqlite")):
        transport_options["connect_args"] = {"timeout": 30}  # wait for SQLite's write lock
    return {
        "broker_url": broker,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": JOBS_QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # the database holds every result
        "task_acks_late": True,  # acknowledged when the job ends: a worker killed mid-job loses nothing
        "task_reject_on_worker_lost": True,  # a worker process that dies puts its job back
        "worker_prefetch_multiplier": 1,  # take one job at a time
        # A pool child that died (killed by the watchdog, the OOM killer) has its job put back and its slot
        # given to the next job after this wait for a result it may have sent first (Celery's default: 10 s).
        # The database holds every result, so there is none to wait for.
        "worker_lost_wait": 1.0,
        "worker_concurrency": 1,
        "worker_hijack_root_logger": False,
    }


class JobQueue:
    """Enqueues jobs by task name; one per API process."""

    def __init__(self, settings: Settings) -> None:
        self.app = Celery("greentrainer-api", set_as_current=False)
        self.app.conf.update(celery_config(settings))

    def load_client(self) -> None:
        """Import the broker's client modules now (kombu loads them on first use); connects to nothing."""
        with self.app.connection_for_write() as connection:
            connection.transport  # noqa: B018 - resolving the transport imports it

    def enqueue_job(self, job_id: str) -> None:
        """Send ``RUN_JOB(job_id)``; call only after the job is committed as ``queued``."""
        self.app.send_task(RUN_JOB, args=[job_id], queue=JOBS_QUEUE)

    def close(self) -> None:
        """Release the broker connections."""
        self.app.close()
