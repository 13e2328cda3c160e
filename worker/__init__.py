"""Celery workers: load a job by id, run greencore.train, persist epochs, events and checkpoints."""
