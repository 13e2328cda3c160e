"""No job lost, no epoch recorded twice: jobs run while workers are killed at random and the broker forgets
everything once.

For each backend (the embedded default, and PostgreSQL + Redis), on a database and broker of its own: start
the API (``greentrainer serve --no-worker``) and ``--workers`` Celery workers (``python -m worker``), submit
``--jobs`` green jobs on the demo model, then ``--kills`` times at random moments pick a job that is running
and SIGKILL either its whole worker (main process and pool child: the worker is started again) or only the
pool child running it (Celery starts another); once, at the first kill, delete every message of the broker (as
a Redis restarted with nothing on disk would). Then wait until every job has ended and read the database: jobs
submitted, succeeded, resumed (started more than once), epochs recorded twice (must be 0), epochs that ran
again after a kill (work redone, not recorded twice), and lost jobs (not succeeded at the end; must be 0).
Writes ``bench/results/faults.md``.

    .venv/bin/python bench/faults.py            # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.client import Client  # noqa: E402
from tests.backends import (  # noqa: E402
    REDIS_URL,
    create_pg_database,
    delete_redis_prefix,
    drop_pg_database,
    forget_broker,
    new_redis_prefix,
)
from tests.processes import clean_env, free_port, stop_group, wait_healthy  # noqa: E402

DEMO = "demo-tiny"
BIN = Path(sys.executable).parent
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Outcome:
    backend: str
    submitted: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # error code -> jobs
    unfinished: int = 0
    resumed: int = 0  # started more than once
    resumed_from_checkpoint: int = 0  # resumed with an epoch checkpoint to start from
    attempts_max: int = 0
    epochs_recorded_twice: int = 0
    epochs_wrong: int = 0  # jobs whose recorded epochs are not exactly 1..n_epochs
    epochs_redone: int = 0  # epochs that ran again after a kill (their first run was lost with the worker)
    final_missing: int = 0  # succeeded jobs without a downloadable final checkpoint
    kills_worker: int = 0
    kills_child: int = 0
    broker_flushed_at_s: float | None = None
    wall_s: float = 0.0

    @property
    def lost(self) -> int:
        return self.submitted - self.succeeded


def parent_of(pid: int) -> int | None:
    """The parent process of ``pid`` (from /proc), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def running_pids(sessions: Any) -> list[int]:
    """Process ids of the pool children running a job now (a running job's ``worker`` is ``host:pid``)."""
    from sqlalchemy import select

    from api.tables import Job

    with sessions() as session:
        workers = session.scalars(select(Job.worker).where(Job.status == "running")).all()
    return [int(w.rpartition(":")[2]) for w in workers if w and w.rpartition(":")[2].isdigit()]


class Workers:
    """``n`` worker processes, each in its own process group, started again after they are killed."""

    def __init__(self, n: int, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: list[subprocess.Popen[bytes]] = [self._start(i) for i in range(n)]
        self.started = n

    def _start(self, slot: int) -> subprocess.Popen[bytes]:
        log = (self.logs / f"worker-{slot}.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "worker"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, child: int, whole: bool) -> bool:
        """SIGKILL the pool child ``child`` running a job, or (``whole``) its worker with it, which is then
        started again; False when ``child`` is not one of these workers' children (it ended meanwhile)."""
        parent = parent_of(child)
        slot = next((i for i, proc in enumerate(self.procs) if proc.pid == parent), None)
        if slot is None:
            return False
        if not whole:
            os.kill(child, signal.SIGKILL)
            return True
        os.killpg(self.procs[slot].pid, signal.SIGKILL)
        self.procs[slot].wait()
        self.procs[slot] = self._start(slot)
        self.started += 1
        return True

    def stop(self) -> None:
        for proc in self.procs:
            stop_group(proc)


def run_backend(
    backend: str, args: argparse.Namespace, work: Path, models: Path, rng: random.Random
) -> Outcome:
    from sqlalchemy import select

    from api.config import Settings
    from api.db import make_session_factory
    from api.tables import Checkpoint, Epoch, Event, Job

    out = Outcome(backend)
    data = work / backend
    data.mkdir()
    key = "gt-" + os.urandom(24).hex()
    port = free_port()
    env_values = {
        "GT_DATA_DIR": str(data),
        "GT_MODELS_DIR": str(models),
        "GT_BOOTSTRAP_API_KEY": key,
        "GT_HEARTBEAT_STALE_S": str(args.stale_s),
        "GT_RECOVERY_INTERVAL_S": str(args.recovery_s),
        "GT_MAX_ATTEMPTS": "100",
        "GT_CANCEL_POLL_S": "0.5",
        "GT_MAX_ACTIVE_JOBS": str(args.jobs),
    }
    database = prefix = None
    if backend == "production":
        database, prefix = create_pg_database(), new_redis_prefix()
        env_values |= {"GT_DATABASE_URL": database, "GT_BROKER_URL": REDIS_URL, "GT_BROKER_PREFIX": prefix}
    env = clean_env(**env_values)
    settings = Settings(
        data_dir=data,
        models_dir=models,
        database_url=database,
        broker_url=REDIS_URL if prefix else None,
        broker_prefix=prefix or "",
    )
    sessions = make_session_factory(settings)
    api_log = data / "api.log"
    api = subprocess.Popen(
        [str(BIN / "greentrainer"), "serve", "--no-worker", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=api_log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    workers = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, api, api_log)
        client = Client(url, key)
        dataset = data / "train.jsonl"
        dataset.write_text(
            "".join(
                f'{{"prompt": "What is {i} plus {i}? ", "completion": "It is {2 * i}."}}\n'
                for i in range(args.examples)
            )
        )
        file_id = client.upload_file(dataset)["id"]
        hp = {"n_epochs": args.epochs, "batch_size": 2, "max_seq_len": 32, "learning_rate": 1e-3, "rho": 0.75}
        start = time.monotonic()
        workers = Workers(args.workers, env, data)
        method = {"type": "green", "green": {"hyperparameters": hp}}  # OpenAI's method object
        jobs = [
            client.create_job({"model": DEMO, "training_file": file_id, "method": method, "seed": i})["id"]
            for i in range(args.jobs)
        ]
        out.submitted = len(jobs)
        kills_left = args.kills
        next_kill = time.monotonic() + rng.expovariate(1 / args.kill_every_s)
        deadline = time.monotonic() + args.timeout_s
        while time.monotonic() < deadline:
            statuses = [client.get_job(j)["status"] for j in jobs]
            if all(s in TERMINAL for s in statuses):
                break
            busy = running_pids(sessions) if kills_left and time.monotonic() >= next_kill else []
            if busy:  # every kill lands on a worker in the middle of a job
                whole = rng.random() < 0.5
                if workers.kill(rng.choice(busy), whole):
                    out.kills_worker += whole
                    out.kills_child += not whole
                    kills_left -= 1
                    next_kill = time.monotonic() + rng.expovariate(1 / args.kill_every_s)
                if out.broker_flushed_at_s is None:
                    forget_broker(settings)
                    out.broker_flushed_at_s = round(time.monotonic() - start, 1)
            time.sleep(0.25)
        out.wall_s = time.monotonic() - start
    finally:
        if workers is not None:
            workers.stop()
        stop_group(api)

    assert settings.artifacts_dir is not None
    with sessions() as session:
        for job_id in jobs:
            job = session.get(Job, job_id)
            assert job is not None
            if job.status == "succeeded":
                out.succeeded += 1
            elif job.status == "failed":
                out.failed[job.error_code or "?"] = out.failed.get(job.error_code or "?", 0) + 1
            else:
                out.unfinished += 1
            out.resumed += job.attempts > 1
            out.attempts_max = max(out.attempts_max, job.attempts)
            recorded = list(session.scalars(select(Epoch.epoch).where(Epoch.job_id == job_id)))
            out.epochs_recorded_twice += len(recorded) - len(set(recorded))
            if job.status == "succeeded" and sorted(recorded) != list(range(1, args.epochs + 1)):
                out.epochs_wrong += 1
            events = list(session.scalars(select(Event).where(Event.job_id == job_id)))
            out.resumed_from_checkpoint += any("resuming from checkpoint" in e.message for e in events)
            done = collections.Counter(e.data["epoch"] for e in events if e.type == "epoch" and e.data)
            out.epochs_redone += sum(n - 1 for n in done.values())
            final = session.scalar(
                select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.name == "final")
            )
            if job.status == "succeeded" and (
                final is None or not (settings.artifacts_dir / final.path).is_dir()
            ):
                out.final_missing += 1
    sessions.kw["bind"].dispose()
    if database:
        drop_pg_database(database)
    if prefix:
        delete_redis_prefix(prefix)
    return out


def report(outcomes: list[Outcome], args: argparse.Namespace, command: str, load: tuple[str, str]) -> str:
    rows = [
        "| backend | jobs | succeeded | lost | failed | resumed (from a checkpoint) | max attempts | "
        "epochs recorded twice | succeeded jobs with epochs not exactly 1..n | epochs run again | "
        "final checkpoint missing | workers killed | pool children killed | broker flushed at | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        failed = ", ".join(f"{k}: {v}" for k, v in o.failed.items()) or "0"
        rows.append(
            f"| {o.backend} | {o.submitted} | {o.succeeded} | {o.lost} | {failed} | {o.resumed} "
            f"({o.resumed_from_checkpoint}) | {o.attempts_max} | {o.epochs_recorded_twice} | "
            f"{o.epochs_wrong} | {o.epochs_redone} | {o.final_missing} | {o.kills_worker} | "
            f"{o.kills_child} | {o.broker_flushed_at_s} s | {o.wall_s:.0f} s |"
        )
    verdicts = []
    for o in outcomes:
        ok = o.lost == 0 and o.epochs_recorded_twice == 0 and o.epochs_wrong == 0 and o.final_missing == 0
        verdicts.append(
            f"- {o.backend}: lost jobs {o.lost} (target 0), epochs recorded twice "
            f"{o.epochs_recorded_twice} (target 0): **{'met' if ok else 'missed'}**"
        )
    return "\n".join(
        [
            "# Faults: workers killed at random, the broker flushed once",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores; load average {load[0]} at start, "
            f"{load[1]} at the end (the machine is shared). {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
            "",
            f"Per backend: {args.jobs} green jobs on the demo model ({args.examples} examples, {args.epochs} "
            f"epochs, batch 2), {args.workers} Celery workers (prefork, one job at a time), {args.kills} "
            f"kills at random moments (exponential gaps, mean {args.kill_every_s:g} s; each picks a running "
            "job and kills its whole worker, which is started again, or only the pool child running it, at "
            "even odds), and the broker's messages deleted once, at the first kill. "
            f"GT_HEARTBEAT_STALE_S={args.stale_s:g}, GT_RECOVERY_INTERVAL_S={args.recovery_s:g}, "
            "GT_MAX_ATTEMPTS=100 (so that a job killed many times is never given up: every job must end "
            "`succeeded`).",
            "",
            "`lost` = submitted - succeeded. `epochs run again`: epochs whose first run died with its worker "
            "and ran again after the resume (work redone, recorded once). `resumed`: jobs started more than "
            "once.",
            "",
            *rows,
            "",
            "Targets:",
            "",
            *verdicts,
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="embedded,production")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--kill-every-s", type=float, default=4.0)
    parser.add_argument("--stale-s", type=float, default=30.0)
    parser.add_argument("--recovery-s", type=float, default=5.0)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults.md")
    args = parser.parse_args()
    from greencore.demo import make_demo_model

    command = " ".join([".venv/bin/python bench/faults.py", *sys.argv[1:]])
    load_start = Path("/proc/loadavg").read_text().split()[0]
    rng = random.Random(args.seed)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="gt-faults-") as tmp:
        work = Path(tmp)
        models = work / "models"
        make_demo_model(models / DEMO)
        for backend in args.backends.split(","):
            print(f"{backend}: {args.jobs} jobs, {args.workers} workers, {args.kills} kills", flush=True)
            outcomes.append(run_backend(backend, args, work, models, rng))
            print(outcomes[-1], flush=True)
    text = report(outcomes, args, command, (load_start, Path("/proc/loadavg").read_text().split()[0]))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return (
        0
        if all(o.lost == 0 and o.epochs_recorded_twice == 0 and o.epochs_wrong == 0 for o in outcomes)
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
