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


def watch(client: Client, job_id: str, out: TextIO, interval_s: float = 1.0) -> dict[str, Any]:
    """Follow a job until it ends, printing its events and redrawing the bar; returns the job."""
    live = out.isatty()
    last_event: int | None = None
    last_line = ""
    while True:
        job = client.get_job(job_id)
        events = client.events(job_id, after=last_event)["data"]
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
