"""Celery task and queue names: the only thing the API knows about the worker. Imports nothing."""

RUN_JOB = "greentrainer.run_job"  # args: [job_id]
JOBS_QUEUE = "greentrainer.jobs"  # one queue; every worker takes one job at a time from it
