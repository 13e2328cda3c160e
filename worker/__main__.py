"""``python -m worker``: one Celery worker taking one job at a time (``greentrainer worker`` runs this)."""

from __future__ import annotations

import os
import socket
import sys

from api.config import get_settings
from api.task_names import JOBS_QUEUE


def main(argv: list[str] | None = None) -> None:
    """Start a worker; extra arguments go to ``celery worker``."""
    from worker.app import app

    settings = get_settings()
    app.worker_main(
        [
            "worker",
            "--loglevel=INFO",
            "--concurrency=1",
            f"--pool={settings.worker_pool}",
            f"--queues={JOBS_QUEUE}",
            f"--hostname=greentrainer-{os.getpid()}@{socket.gethostname()}",
            "--without-gossip",
            "--without-mingle",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )


if __name__ == "__main__":
    main()
