"""The measured throughput behind estimates: the latest finished epochs of a device profile, read from the
epochs table the workers write, and the calibration greencore fits on them (``greencore.throughput``).

Each estimate asks for at most CALIBRATION_EPOCHS epochs per match level (device profile, model and method;
device profile and model; device profile) and keeps the answer CALIBRATION_TTL_S seconds per API process, so
an estimate costs at most three small indexed queries, and most cost none. Epochs of every tenant calibrate
the device profile, but only as aggregate throughput: an estimate says how many epochs it rests on, never
whose or which.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.tables import Epoch, Job
from greencore.spec import EnergySettings
from greencore.throughput import Calibration, Throughput, calibrate

CALIBRATION_EPOCHS = 50  # the latest epochs read per match level
CALIBRATION_TTL_S = 30.0  # how long an API process reuses what it read


class TtlCache:
    """Values by key, each kept ``ttl_s`` seconds. Thread-safe; two threads missing a key both compute it."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[Hashable, tuple[float, tuple[Throughput, ...]]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> tuple[Throughput, ...] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or time.monotonic() - entry[0] > self.ttl_s:
                return None
            return entry[1]

    def put(self, key: Hashable, value: tuple[Throughput, ...]) -> None:
        with self._lock:
            now = time.monotonic()
            self._entries = {k: v for k, v in self._entries.items() if now - v[0] <= self.ttl_s}
            self._entries[key] = (now, value)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


RECORDS = TtlCache(CALIBRATION_TTL_S)


def throughput_records(
    session: Session, device: str, model: str, method: str, limit: int = CALIBRATION_EPOCHS
) -> tuple[Throughput, ...]:
    """The latest ``limit`` epochs recorded on device profile ``device`` at each match level (same model and
    method, same model, any), each epoch once; cached CALIBRATION_TTL_S seconds."""
    key = (str(session.get_bind().url), device, model, method, limit)
    cached = RECORDS.get(key)
    if cached is not None:
        return cached
    base = (
        select(
            Epoch.id,
            Epoch.flops,
            Epoch.steps,
            Epoch.wall_s,
            Epoch.valid_wall_s,
            Epoch.tokens,
            Epoch.energy_j,
            Epoch.energy_method,
            Job.model,
            Job.method,
        )
        .join(Job, Job.id == Epoch.job_id)
        .where(Epoch.device == device)
        .order_by(Epoch.id.desc())
        .limit(limit)
    )
    levels = (base.where(Job.model == model, Job.method == method), base.where(Job.model == model), base)
    seen: dict[int, Throughput] = {}
    for query in levels:
        for row in session.execute(query):
            if row.id not in seen:
                seen[row.id] = Throughput(
                    device=device,
                    model=row.model,
                    method=row.method,
                    flops=int((row.flops or {}).get("total", 0) or 0),
                    steps=row.steps,
                    train_s=max(0.0, row.wall_s - row.valid_wall_s),
                    wall_s=row.wall_s,
                    tokens=row.tokens,
                    energy_j=row.energy_j,
                    energy_method=row.energy_method,
                )
    records = tuple(seen.values())
    RECORDS.put(key, records)
    return records


def calibration_for(session: Session, energy: EnergySettings, model: str, method: str) -> Calibration:
    """The calibration of an estimate of ``method`` on ``model`` on the configured device profile."""
    records = throughput_records(session, energy.device_name, model, method)
    return calibrate(records, model, method, energy)
