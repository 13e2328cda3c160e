"""A live progress bar of a job for the terminal: epoch, step, ETA and FLOPs saved."""

from __future__ import annotations

import time
from typing import Any, TextIO

from api.client import Client

TERMINAL = ("succeeded", "failed", "cancelled")


def duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``12s``; ``--`` when unknown."""
    if seconds is None:
        return "--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(job: dict[str, Any], width: int = 24) -> str:
    """One line: status, epoch and step, a bar, percent, ETA and FLOPs saved against full fine-tuning."""
    progress = job["progress"]
    fraction = float(progress.get("fraction") or 0.0)
    filled = int(round(fraction * width))
    bar = "#" * filled + "." * (width - filled)
    epoch = f"epoch {progress.get('epoch') or 0}/{progress['n_epochs']}"
    step = f"step {progress.get('step') or 0}/{progress.get('steps_in_epoch') or '?'}"
    saved = job["flops"].get("saved")
    if saved is None and job.get("estimate"):
        saved_text = f"FLOPs saved ~{100 * job['estimate']['flops_saved']:.1f}% (estimate)"
    else:
        saved_text = f"FLOPs saved {100 * saved:.1f}%" if saved is not None else "FLOPs saved --"
    return (
        f"{job['status']:<9} {epoch} {step} [{bar}] {100 * fraction:5.1f}% "
        f"ETA {duration(progress.get('eta_s'))}  {saved_text}"
    )


def _event_number(event_id: str) -> int:
    """The order of an event: ``ftevent-N`` is the N-th event the service recorded."""
    return int(event_id.rsplit("-", 1)[-1])


def new_events(client: Client, job_id: str, last: str | None) -> list[dict[str, Any]]:
    """The job's events recorded after event ``last`` (None: every event), oldest first. The API lists them
    newest first, a page ``after`` an event holding the older ones: pages are read back to ``last``."""
    seen = _event_number(last) if last is not None else -1
    found: list[dict[str, Any]] = []
    after = None
    while True:
        page = client.events(job_id, after=after, limit=100)
        for event in page["data"]:
            if _event_number(event["id"]) <= seen:
                return found[::-1]
            found.append(event)
        if not page["has_more"] or not page["data"]:
            return found[::-1]
        after = page["data"][-1]["id"]


def watch(client: Client, job_id: str, out: TextIO, interval_s: float = 1.0) -> dict[str, Any]:
    """Follow a job until it ends, printing its events and redrawing the bar; returns the job."""
    live = out.isatty()
    last_event: str | None = None
    last_line = ""
    while True:
        job = client.get_job(job_id)
        events = new_events(client, job_id, last_event)
        if events and live:
            out.write("\r\x1b[2K")
        for event in events:
            out.write(f"  {event['message']}\n")
            last_event = event["id"]
        line = progress_line(job)
        if live:
            out.write("\r\x1b[2K" + line)
        elif line != last_line:
            out.write(line + "\n")
        out.flush()
        last_line = line
        if job["status"] in TERMINAL:
            if live:
                out.write("\n")
            return job
        time.sleep(interval_s)
