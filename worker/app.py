"""The Celery app of the workers. Configuration is api.queue's (shared with the API's client), plus what only
a worker needs: one job per child process, and recovery (api/recovery.py) at start and every
GT_RECOVERY_INTERVAL_S, run by the worker's main process on its timer."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, bootsteps

from api.config import Settings, get_settings
from api.db import make_session_factory
from api.queue import JobQueue, celery_config
from api.recovery import Recovery, recover

log = logging.getLogger(__name__)


class Recoverer:
    """Runs api.recovery.recover for a worker; its database connections are opened per sweep and closed after
    (the main process forks the children that run jobs: they must not inherit an open connection)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions = make_session_factory(settings, pooled=False)
        self.queue = JobQueue(settings)

    def sweep(self) -> Recovery | None:
        """One recovery; errors are logged (the database or the broker may be down: the next sweep
        retries)."""
        try:
            done = recover(self.sessions, self.settings, self.queue)
        except Exception:  # a failed sweep must not stop the worker
            log.exception("recovery failed; trying again in %g s", self.settings.recovery_interval_s)
            return None
        if done:
            log.warning(
                "recovery: requeued %s, failed %s, enqueued again %s",
                done.requeued,
                done.failed,
                done.reenqueued,
            )
        return done

    def close(self) -> None:
        self.queue.close()
        self.sessions.kw["bind"].dispose()


class RecoveryStep(bootsteps.StartStopStep):
    """A worker bootstep: one sweep when the worker starts, then one every GT_RECOVERY_INTERVAL_S."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.recoverer: Recoverer | None = None
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        settings = get_settings()
        self.recoverer = Recoverer(settings)
        self.recoverer.sweep()
        self.tref = parent.timer.call_repeatedly(settings.recovery_interval_s, self.recoverer.sweep)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if self.recoverer is not None:
            self.recoverer.close()
            self.recoverer = None


def make_celery(settings: Settings) -> Celery:
    """A worker app for ``settings``: one job at a time, acknowledged when it ends."""
    app = Celery("greentrainer-worker", include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    # A fresh process per job: GPU memory and any state a job leaves behind go with it.
    app.conf.worker_max_tasks_per_child = 1
    app.steps["worker"].add(RecoveryStep)
    return app


app = make_celery(get_settings())
