"""No job lost, no epoch recorded twice, nothing written by a worker declared lost: jobs run while workers are
killed, paused and hung at random and the broker forgets everything once.

For each backend (the embedded default, and PostgreSQL + Redis), on a database and broker of its own: start
the API (``greentrainer serve --no-worker``) and ``--workers`` Celery workers (``python -m worker``), plus
one worker whose training steps hang (tests/faults/sitecustomize.py: each of its pool children hangs at step
``--hang-after`` of its job, the heartbeat going on; it is stopped after ``--hangs`` stalls), submit
``--jobs`` green jobs on the demo model, then at random moments (exponential gaps) pick a job that is running
and either SIGKILL its whole worker (main process and pool child: the worker is started again) or only the
pool child running it (Celery starts another) (``--kills`` times), or SIGSTOP its worker for longer than the
heartbeat limit and SIGCONT it once another worker may have taken the job over (``--pauses`` times); once, at
the first fault, delete every message of the broker (as a Redis restarted with nothing on disk would). Then
wait until every job has ended and read the database: jobs submitted, succeeded, resumed (started more than
once), epochs recorded twice (must be 0), checkpoints written by an attempt after the next attempt had claimed
the job (stale writes, must be 0), epochs that ran again after a fault (work redone, not recorded twice),
stalls caught by the watchdog, writes the paused workers tried and were refused, and lost jobs (not succeeded
at the end; must be 0). Writes ``bench/results/faults.md``.

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
    pauses: int = 0  # workers SIGSTOPped past the heartbeat limit, then resumed
    stalls: int = 0  # runs the watchdog handed back (a step hung)
    refused: int = 0  # writes of attempts that no longer owned their job, refused (from the workers' logs)
    stale_writes: int = 0  # checkpoints recorded by an attempt after the next one claimed the job (must be 0)
    broker_flushed_at_s: float | None = None
    wall_s: float = 0.0

    @property
    def lost(self) -> int:
        return self.submitted - self.succeeded

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing recorded twice or by a replaced attempt."""
        return not (
            self.lost
            or self.epochs_recorded_twice
            or self.epochs_wrong
            or self.final_missing
            or self.stale_writes
        )


def parent_of(pid: int) -> int | None:
    """The parent process of ``pid`` (from /proc), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def stalls(sessions: Any, jobs: list[str]) -> int:
    """Runs the watchdog handed back so far."""
    from sqlalchemy import func, select

    from api.tables import Event

    with sessions() as session:
        return session.scalar(
            select(func.count())
            .select_from(Event)
            .where(Event.job_id.in_(jobs), Event.message.contains("no training step completed"))
        )


def running_pids(sessions: Any) -> list[int]:
    """Process ids of the pool children running a job now (a running job's ``worker`` is ``host:pid``)."""
    from sqlalchemy import select

    from api.tables import Job

    with sessions() as session:
        workers = session.scalars(select(Job.worker).where(Job.status == "running")).all()
    return [int(w.rpartition(":")[2]) for w in workers if w and w.rpartition(":")[2].isdigit()]


class Workers:
    """``n`` worker processes, each in its own process group, started again after they are killed; with
    ``hang_env``, one more (the last slot) whose training steps hang."""

    def __init__(self, n: int, env: dict[str, str], logs: Path, hang_env: dict[str, str] | None) -> None:
        self.env, self.logs, self.hang_env = env, logs, hang_env
        self.procs: list[subprocess.Popen[bytes]] = [self._start(i, False) for i in range(n)]
        if hang_env is not None:
            self.procs.append(self._start(n, True))
        self.started = len(self.procs)
        self.paused: list[tuple[int, float]] = []  # (process group, when to resume it)

    def _start(self, slot: int, hangs: bool) -> subprocess.Popen[bytes]:
        log = (self.logs / f"worker-{slot}.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "worker"],
            cwd=ROOT,
            env={**self.env, **(self.hang_env or {})} if hangs else self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _slot_of(self, child: int) -> int | None:
        """The slot of the worker (not the hanging one) whose pool child ``child`` is; None when it ended."""
        parent = parent_of(child)
        slots = len(self.procs) - (self.hang_env is not None)
        return next((i for i, proc in enumerate(self.procs[:slots]) if proc.pid == parent), None)

    def pause(self, child: int, for_s: float) -> bool:
        """SIGSTOP the worker running pool child ``child`` (main process and children) for ``for_s``."""
        slot = self._slot_of(child)
        if slot is None:
            return False
        os.killpg(self.procs[slot].pid, signal.SIGSTOP)
        self.paused.append((self.procs[slot].pid, time.monotonic() + for_s))
        return True

    def is_paused(self, child: int) -> bool:
        """Whether pool child ``child`` belongs to a paused worker (a fault never lands on one: a kill would
        take away the very process whose return the pause is there to test)."""
        return parent_of(child) in {group for group, _ in self.paused}

    def resume_due(self, everything: bool = False) -> None:
        """SIGCONT the paused workers whose time has come (``everything``: all of them)."""
        now = time.monotonic()
        for group, at in [p for p in self.paused if everything or p[1] <= now]:
            try:
                os.killpg(group, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.paused.remove((group, at))

    def stop_hanging(self) -> None:
        """Stop the worker whose steps hang."""
        if self.hang_env is not None:
            stop_group(self.procs.pop())
            self.hang_env = None

    def kill(self, child: int, whole: bool) -> bool:
        """SIGKILL the pool child ``child`` running a job, or (``whole``) its worker with it, which is then
        started again; False when ``child`` is not one of these workers' children (it ended meanwhile)."""
        slot = self._slot_of(child)
        if slot is None:
            return False
        if not whole:
            os.kill(child, signal.SIGKILL)
            return True
        os.killpg(self.procs[slot].pid, signal.SIGKILL)
        self.procs[slot].wait()
        self.procs[slot] = self._start(slot, False)
        self.started += 1
        return True

    def stop(self) -> None:
        self.resume_due(everything=True)
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
        "GT_STALL_TIMEOUT_S": str(args.stall_s),
        # This bench polls every job four times a second with one key: no rate limit (0 = unlimited).
        "GT_RATE_LIMIT_KEY_PER_MIN": "0",
        "GT_RATE_LIMIT_TENANT_PER_MIN": "0",
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
        hang_env = {
            "PYTHONPATH": str(ROOT / "tests" / "faults"),
            "GT_TEST_HANG_AFTER_STEPS": str(args.hang_after),
        }
        workers = Workers(args.workers, env, data, hang_env if args.hangs else None)
        method = {"type": "green", "green": {"hyperparameters": hp}}  # OpenAI's method object
        jobs = [
            client.create_job({"model": DEMO, "training_file": file_id, "method": method, "seed": i})["id"]
            for i in range(args.jobs)
        ]
        out.submitted = len(jobs)
        faults = ["kill"] * args.kills + ["pause"] * args.pauses
        rng.shuffle(faults)
        pause_s = args.stale_s + 2 * args.recovery_s + 5  # long enough for another worker to take over
        next_fault = time.monotonic() + rng.expovariate(1 / args.kill_every_s)
        deadline = time.monotonic() + args.timeout_s
        while time.monotonic() < deadline:
            workers.resume_due()
            statuses = [client.get_job(j)["status"] for j in jobs]
            if all(s in TERMINAL for s in statuses):
                break
            if workers.hang_env is not None and stalls(sessions, jobs) >= args.hangs:
                workers.stop_hanging()
            busy = running_pids(sessions) if faults and time.monotonic() >= next_fault else []
            busy = [child for child in busy if not workers.is_paused(child)]
            if busy:  # every fault lands on a worker in the middle of a job
                child = rng.choice(busy)
                if faults[-1] == "pause":
                    done = workers.pause(child, pause_s)
                    out.pauses += done
                else:
                    whole = rng.random() < 0.5
                    done = workers.kill(child, whole)
                    out.kills_worker += done and whole
                    out.kills_child += done and not whole
                if done:
                    faults.pop()
                    next_fault = time.monotonic() + rng.expovariate(1 / args.kill_every_s)
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
            events = list(session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))
            out.resumed_from_checkpoint += any("resuming from checkpoint" in e.message for e in events)
            out.stalls += sum("no training step completed" in e.message for e in events)
            # Attempt k + 1 claimed the job at its k + 1-th "running" event: attempt k's checkpoints must all
            # be older.
            claimed = [
                e.created_at
                for e in events
                if e.type == "status" and (e.data or {}).get("status") == "running"
            ]
            for row in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)):
                attempt = int(row.path.split("/attempt-")[1].split("/")[0])
                out.stale_writes += attempt < len(claimed) and row.created_at > claimed[attempt]
            done = collections.Counter(e.data["epoch"] for e in events if e.type == "epoch" and e.data)
            out.epochs_redone += sum(n - 1 for n in done.values())
            final = session.scalar(
                select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.name == "final")
            )
            if job.status == "succeeded" and (
                final is None or not (settings.artifacts_dir / final.path).is_dir()
            ):
                out.final_missing += 1
    out.refused = sum(
        log.read_text(errors="replace").count("no longer owns it") for log in data.glob("worker-*.log")
    )
    sessions.kw["bind"].dispose()
    if database:
        drop_pg_database(database)
    if prefix:
        delete_redis_prefix(prefix)
    return out


def report(outcomes: list[Outcome], args: argparse.Namespace, command: str, load: tuple[str, str]) -> str:
    rows = [
        "| backend | jobs | succeeded | lost | failed | resumed (from a checkpoint) | max attempts | "
        "epochs recorded twice | succeeded jobs with epochs not exactly 1..n | stale writes recorded | "
        "epochs run again | final checkpoint missing | workers killed | pool children killed | "
        "workers paused | stale writes refused | hung steps caught | broker flushed at | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        failed = ", ".join(f"{k}: {v}" for k, v in o.failed.items()) or "0"
        rows.append(
            f"| {o.backend} | {o.submitted} | {o.succeeded} | {o.lost} | {failed} | {o.resumed} "
            f"({o.resumed_from_checkpoint}) | {o.attempts_max} | {o.epochs_recorded_twice} | "
            f"{o.epochs_wrong} | {o.stale_writes} | {o.epochs_redone} | {o.final_missing} | "
            f"{o.kills_worker} | {o.kills_child} | {o.pauses} | {o.refused} | {o.stalls} | "
            f"{o.broker_flushed_at_s} s | {o.wall_s:.0f} s |"
        )
    verdicts = []
    for o in outcomes:
        verdicts.append(
            f"- {o.backend}: lost jobs {o.lost} (target 0), epochs recorded twice "
            f"{o.epochs_recorded_twice} (target 0), stale writes recorded {o.stale_writes} (target 0): "
            f"**{'met' if o.ok else 'missed'}**"
        )
    return "\n".join(
        [
            "# Faults: workers killed, paused and hung at random, the broker flushed once",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores; load average {load[0]} at start, "
            f"{load[1]} at the end (the machine is shared). {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
            "",
            f"Per backend: {args.jobs} green jobs on the demo model ({args.examples} examples, {args.epochs} "
            f"epochs, batch 2), {args.workers} Celery workers (prefork, one job at a time) and one more "
            f"whose training steps hang at step {args.hang_after} of every job (stopped after {args.hangs} "
            "stalls), "
            f"{args.kills} kills and {args.pauses} pauses at random moments (exponential gaps, mean "
            f"{args.kill_every_s:g} s; each picks a running job; a kill takes its whole worker, which is "
            "started again, or only the pool child running it, at even odds; a pause SIGSTOPs its worker for "
            f"{args.stale_s + 2 * args.recovery_s + 5:g} s, past the heartbeat limit, then SIGCONTs it), and "
            "the broker's messages deleted once, at the first fault. "
            f"GT_HEARTBEAT_STALE_S={args.stale_s:g}, GT_RECOVERY_INTERVAL_S={args.recovery_s:g}, "
            f"GT_STALL_TIMEOUT_S={args.stall_s:g}, GT_MAX_ATTEMPTS=100 (so that a job hit many times is "
            "never given up: every job must end `succeeded`).",
            "",
            "`stale writes recorded`: checkpoints recorded by an attempt after the next attempt had claimed "
            "the job (a paused worker writing into its successor's run; must be 0). `stale writes refused`: "
            "writes the resumed workers attempted and were refused (fencing at work). `hung steps caught`: "
            "runs the watchdog handed back.",
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
    parser.add_argument("--pauses", type=int, default=3)
    parser.add_argument("--hangs", type=int, default=2, help="stalls before the hanging worker is stopped")
    parser.add_argument("--hang-after", type=int, default=20, help="steps of a job before one hangs")
    # Longer than a pause (stale + 2 recovery intervals + 5 s): a paused worker that comes back must meet the
    # fence, not its own watchdog (which would see no step for the whole pause and end the process first).
    parser.add_argument("--stall-s", type=float, default=40.0)
    parser.add_argument("--kill-every-s", type=float, default=4.0)
    parser.add_argument("--stale-s", type=float, default=10.0)
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
            print(
                f"{backend}: {args.jobs} jobs, {args.workers} workers, {args.kills} kills, {args.pauses} "
                f"pauses, {args.hangs} hangs",
                flush=True,
            )
            outcomes.append(run_backend(backend, args, work, models, rng))
            print(outcomes[-1], flush=True)
    text = report(outcomes, args, command, (load_start, Path("/proc/loadavg").read_text().split()[0]))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
