"""The Celery app of the workers. Configuration is api.queue's (shared with the API's client), plus what only
a worker needs."""

from __future__ import annotations

from celery import Celery

from api.config import Settings, get_settings
from api.queue import celery_config


def make_celery(settings: Settings) -> Celery:
    """A worker app for ``settings``: one job at a time, acknowledged when it ends."""
    app = Celery("greentrainer-worker", include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    # A fresh process per job: GPU memory and any state a job leaves behind go with it.
    app.conf.worker_max_tasks_per_child = 1
    return app


app = make_celery(get_settings())
