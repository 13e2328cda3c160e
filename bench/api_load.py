"""API latency under load: 50 concurrent clients creating and polling jobs against PostgreSQL and Redis.

Starts ``greentrainer serve --no-worker`` on a fresh PostgreSQL database and a Redis key prefix of its own (no
worker runs: jobs stay queued, which is the state clients poll most), uploads one dataset, and runs clients
that each loop: ``POST /v1/fine_tuning/jobs``, then ``GET /v1/fine_tuning/jobs/{id}`` every ``--poll-s``
seconds, ``--polls`` times.
Runs: *paced* (clients poll like ``greentrainer jobs create --wait``, every second, then every 0.5 s) and
*saturated* (no pause at all: the server's capacity on this machine). Reports p50/p90/p99/max latency per
route, measured at the client, and writes ``bench/results/api_load.md``.

``--slow-downloads N`` runs another case instead: N checkpoint downloads that read a few KB per second, each
holding its response open, while one client reads ``GET /v1/fine_tuning/jobs/{id}`` and ``GET /v1/models``
(before the downloads open, then while they are open); it rewrites only its own section of the results file.

    .venv/bin/python bench/api_load.py                      # about 2 minutes
    .venv/bin/python bench/api_load.py --slow-downloads 50  # about 1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import stop_group, wait_healthy  # noqa: E402
from tests.service.service_calls import add_checkpoint  # noqa: E402

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
TARGET_P99_MS = 100.0
HP = {"n_epochs": 2, "batch_size": 2, "max_seq_len": 32, "rho": 0.75}
SLOW_HEADING = "## Slow checkpoint downloads"
SLOW_READ_BYTES = 2048  # a slow download reads this many bytes...
SLOW_READ_PAUSE_S = 0.5  # ...then waits this long: 4 KB/s
SLOW_CHECKPOINT_BYTES = 256 << 20  # far more than a download reads in the run: none ends early


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def server_s(response: httpx.Response) -> float:
    """The application's own time on a request, from its Server-Timing header."""
    return float(response.headers["server-timing"].split("dur=")[1]) / 1000


async def client_loop(
    http: httpx.AsyncClient,
    body: dict,
    deadline: float,
    polls: int,
    poll_s: float,
    record: dict[str, list[float]],
    errors: list[str],
) -> None:
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        response = await http.post("/v1/fine_tuning/jobs", json=body)
        record["POST /v1/fine_tuning/jobs"].append(time.perf_counter() - start)
        record["server POST /v1/fine_tuning/jobs"].append(server_s(response))
        if response.status_code != 200:
            errors.append(f"POST {response.status_code} {response.text[:200]}")
            await asyncio.sleep(poll_s)
            continue
        job_id = response.json()["id"]
        for _ in range(polls):
            if poll_s:
                await asyncio.sleep(poll_s)
            if time.perf_counter() >= deadline:
                return
            start = time.perf_counter()
            response = await http.get(f"/v1/fine_tuning/jobs/{job_id}")
            record["GET /v1/fine_tuning/jobs/{id}"].append(time.perf_counter() - start)
            record["server GET /v1/fine_tuning/jobs/{id}"].append(server_s(response))
            if response.status_code != 200:
                errors.append(f"GET {response.status_code} {response.text[:200]}")


async def run_load(
    url: str, key: str, body: dict, clients: int, seconds: float, polls: int, poll_s: float
) -> tuple[dict[str, list[float]], list[str], float]:
    record: dict[str, list[float]] = {
        "POST /v1/fine_tuning/jobs": [],
        "GET /v1/fine_tuning/jobs/{id}": [],
        "server POST /v1/fine_tuning/jobs": [],
        "server GET /v1/fine_tuning/jobs/{id}": [],
    }
    errors: list[str] = []
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    https = [
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=30)
        for _ in range(clients)
    ]
    started = time.perf_counter()
    deadline = started + seconds

    # Clients start spread over one poll interval, as independent users would.
    async def staggered(i: int, http: httpx.AsyncClient) -> None:
        await asyncio.sleep((poll_s or 0.05) * i / clients)
        await client_loop(http, body, deadline, polls, poll_s, record, errors)

    await asyncio.gather(*(staggered(i, h) for i, h in enumerate(https)))
    elapsed = time.perf_counter() - started
    for http in https:
        await http.aclose()
    return record, errors, elapsed


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_and_rss_mib(pids: list[int]) -> tuple[int, float]:
    """Threads and resident memory (MiB) of these processes together, from /proc."""
    threads, rss_kib = 0, 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                threads += int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss_kib += int(line.split()[1])
    return threads, rss_kib / 1024


def cpu_pressure() -> str:
    """Share of the last minute in which some task waited for a CPU (Linux PSI), or '?'."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return "?"
    return f"{float(first.split('avg60=')[1].split()[0]):.0f}%"


def summary_rows(
    name: str, record: dict[str, list[float]], elapsed: float, api_cpu: float, client_cpu: float
) -> list[str]:
    rows = []
    for route in ("POST /v1/fine_tuning/jobs", "GET /v1/fine_tuning/jobs/{id}"):
        ms = [v * 1000 for v in record[route]]
        server = [v * 1000 for v in record[f"server {route}"]]
        p99 = percentile(ms, 99)
        rows.append(
            f"| {name} | `{route}` | {len(ms)} | {len(ms) / elapsed:.0f} | {statistics.median(ms):.1f} | "
            f"{percentile(ms, 90):.1f} | {p99:.1f} | {max(ms):.1f} | "
            f"{'yes' if p99 < TARGET_P99_MS else 'no'} | {statistics.median(server):.1f} / "
            f"{percentile(server, 99):.1f} | {100 * api_cpu / elapsed:.0f}% / "
            f"{100 * client_cpu / elapsed:.0f}% | {os.getloadavg()[0]:.1f} / {cpu_pressure()} |"
        )
    return rows


def probe_commits(database: str, n: int = 500) -> str:
    """p50 / p99 / max of a bare PostgreSQL commit (one 3 KB row, as a job is) on this machine right now."""
    times = []
    with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={database}") as conn:
        conn.execute("CREATE TABLE commit_probe (body jsonb)")
        conn.commit()
        row = json.dumps({"pad": "x" * 3000})
        for _ in range(n):
            start = time.perf_counter()
            conn.execute("INSERT INTO commit_probe VALUES (%s)", (row,))
            conn.commit()
            times.append((time.perf_counter() - start) * 1000)
            time.sleep(0.01)
        conn.execute("DROP TABLE commit_probe")
        conn.commit()
    return f"p50 {percentile(times, 50):.1f} ms, p99 {percentile(times, 99):.1f} ms, max {max(times):.1f} ms"


def add_big_checkpoint(database_url: str, artifacts_dir: Path, job_id: str) -> str:
    """A checkpoint of ``job_id`` whose folder holds a sparse SLOW_CHECKPOINT_BYTES safetensors file,
    recorded as the worker records one; its id."""
    from api.config import Settings
    from api.db import make_session_factory

    sessions = make_session_factory(Settings(database_url=database_url, artifacts_dir=artifacts_dir))
    try:
        return add_checkpoint(sessions, artifacts_dir, job_id, SLOW_CHECKPOINT_BYTES)
    finally:
        sessions.kw["bind"].dispose()


class SlowDownload(threading.Thread):
    """``GET path`` on a raw socket with a small receive buffer, read SLOW_READ_BYTES every
    SLOW_READ_PAUSE_S until ``stop`` is set: the server's answer stays open all along."""

    def __init__(self, port: int, path: str, key: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.key, self.stop = port, path, key, stop
        self.status = ""  # the status line, once the answer started
        self.bytes_read = 0
        self.closed_early = False  # the server ended the answer (or the connection) before ``stop``
        self.error = ""

    def run(self) -> None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
                sock.settimeout(30)
                sock.connect(("127.0.0.1", self.port))
                sock.sendall(
                    f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: Bearer {self.key}\r\n\r\n".encode()
                )
                while not self.stop.is_set():
                    data = sock.recv(SLOW_READ_BYTES)
                    if not data:
                        self.closed_early = True
                        return
                    if not self.status:
                        self.status = data.split(b"\r\n", 1)[0].decode(errors="replace")
                    self.bytes_read += len(data)
                    self.stop.wait(SLOW_READ_PAUSE_S)
        except OSError as exc:
            self.error = repr(exc)


def measure_reads(url: str, key: str, job_id: str, requests: int) -> dict[str, list[float]]:
    """``requests`` of each of ``GET /v1/fine_tuning/jobs/{id}`` and ``GET /v1/models``, one at a time,
    taking turns, 10 ms apart; client and server (Server-Timing) milliseconds per route."""
    routes = {
        "GET /v1/fine_tuning/jobs/{id}": f"/v1/fine_tuning/jobs/{job_id}",
        "GET /v1/models": "/v1/models",
    }
    record: dict[str, list[float]] = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        for _ in range(requests):
            for route, path in routes.items():
                start = time.perf_counter()
                response = http.get(path)
                elapsed_ms = (time.perf_counter() - start) * 1000
                if response.status_code != 200:
                    raise RuntimeError(f"{route}: {response.status_code} {response.text[:200]}")
                record.setdefault(route, []).append(elapsed_ms)
                record.setdefault(f"server {route}", []).append(server_s(response) * 1000)
                time.sleep(0.01)
    return record


def read_rows(case: str, record: dict[str, list[float]]) -> list[str]:
    rows = []
    for route in ("GET /v1/fine_tuning/jobs/{id}", "GET /v1/models"):
        ms, server = record[route], record[f"server {route}"]
        p99 = percentile(ms, 99)
        rows.append(
            f"| {case} | `{route}` | {len(ms)} | {statistics.median(ms):.1f} | {p99:.1f} | {max(ms):.1f} | "
            f"{'yes' if p99 < TARGET_P99_MS else 'no'} | {statistics.median(server):.1f} / "
            f"{percentile(server, 99):.1f} | {os.getloadavg()[0]:.1f} / {cpu_pressure()} |"
        )
    return rows


def run_slow_downloads(
    url: str,
    port: int,
    key: str,
    body: dict,
    database_url: str,
    artifacts_dir: Path,
    n: int,
    requests: int,
    api_pids: Callable[[], list[int]],
) -> tuple[list[str], str]:
    """The slow-downloads case: table rows (without, then with ``n`` slow downloads open) and a line on the
    downloads themselves and on the API processes (``api_pids``) meanwhile."""
    headers = {"Authorization": f"Bearer {key}"}
    created = httpx.post(f"{url}/v1/fine_tuning/jobs", headers=headers, json=body, timeout=60)
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    checkpoint_id = add_big_checkpoint(database_url, artifacts_dir, job_id)
    rows = read_rows("no download open", measure_reads(url, key, job_id, requests))
    threads_before, rss_before = threads_and_rss_mib(api_pids())
    print("\n".join(rows), flush=True)
    stop = threading.Event()
    path = f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}/content"
    downloads = [SlowDownload(port, path, key, stop) for _ in range(n)]
    for download in downloads:
        download.start()
    try:
        deadline = time.monotonic() + 60
        while any(not d.status and not d.error for d in downloads) and time.monotonic() < deadline:
            time.sleep(0.1)
        started = sum(d.status.endswith(" 200 OK") for d in downloads)
        if started < n:
            raise RuntimeError(f"only {started} of {n} downloads started: {[d.error for d in downloads][:3]}")
        time.sleep(2)  # every answer under way and its buffers full
        record = measure_reads(url, key, job_id, requests)
        threads_during, rss_during = threads_and_rss_mib(api_pids())
        still_open = sum(d.is_alive() and not d.closed_early and not d.error for d in downloads)
    finally:
        stop.set()
        for download in downloads:
            download.join(5)
    rows += read_rows(f"{n} slow downloads open", record)
    print("\n".join(rows[-2:]), flush=True)
    read_kb = [d.bytes_read / 1024 for d in downloads]
    note = (
        f"All {n} downloads answered 200 and {still_open} of {n} were still open when the measurement "
        f"ended; each had read {min(read_kb):.0f} to {max(read_kb):.0f} KB of its "
        f"{SLOW_CHECKPOINT_BYTES >> 20} MiB archive. The API process(es): {threads_before} threads and "
        f"{rss_before:.0f} MiB resident before the downloads, {threads_during} threads and {rss_during:.0f} "
        "MiB while they were open."
    )
    return rows, note


def replace_section(text: str, heading: str, section: str) -> str:
    """``text`` with its section under ``heading`` (up to the next ``## `` heading) replaced by ``section``,
    or with ``section`` appended."""
    start = text.find(heading)
    if start < 0:
        return text.rstrip("\n") + "\n\n" + section
    end = text.find("\n## ", start + len(heading))
    return text[:start] + section + (text[end + 1 :] if end >= 0 else "")


def write_slow_section(args: argparse.Namespace, rows: list[str], note: str) -> None:
    """Write (or replace) the slow-downloads section of the results file."""
    section = [
        SLOW_HEADING,
        "",
        f"Written by `bench/api_load.py --slow-downloads {args.slow_downloads}` on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), shared by the API, PostgreSQL, Redis and the load "
        f"generator. `greentrainer serve --no-worker` with {args.api_workers} uvicorn process(es). "
        f"{args.slow_downloads} downloads of one checkpoint (`GET /v1/fine_tuning/jobs/{{id}}/checkpoints/"
        f"{{id}}/content`, a {SLOW_CHECKPOINT_BYTES >> 20} MiB tar) on raw sockets with a 4 KB receive "
        f"buffer, each reading {SLOW_READ_BYTES // 1024} KB every {SLOW_READ_PAUSE_S:g} s, so that each "
        f"holds its answer open for the whole measurement; one client reads each route {args.requests} "
        "times, one request at a time, the two routes taking turns 10 ms apart, first with no download "
        f"open, then with the {args.slow_downloads} open. Target: p99 under {TARGET_P99_MS:.0f} ms.",
        "",
        "| case | route | requests | p50 ms | p99 ms | max ms | p99 < 100 ms | server p50 / p99 ms | "
        "load avg / CPU pressure |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        note,
        "",
        "Why open downloads do not hold up other requests: the download route reads the job and the "
        "checkpoint, then closes its database session before the first byte (no pool connection is held "
        "while a client reads; tests/service/test_downloads.py), and Starlette runs the archive's generator "
        "on a thread only for each `next()`, which reads at most one 1 MiB chunk (`api/archive.py` CHUNK) "
        "from disk; waiting for a slow client is an `await` on its socket in the event loop, so a slow "
        "download holds none of anyio's 40 threads and none of the API's database threads (`api/deps.py`). "
        "What an open download does hold is memory: the chunk being sent, in uvicorn's write buffer, and the "
        "socket's buffers (the resident memory above).",
        "",
    ]
    previous = args.out.read_text() if args.out.exists() else ""
    args.out.write_text(replace_section(previous, SLOW_HEADING, "\n".join(section)))
    print(f"wrote {args.out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each run")
    parser.add_argument("--polls", type=int, default=10, help="GETs of each job before creating the next")
    parser.add_argument(
        "--poll-s",
        type=float,
        nargs="+",
        default=[1.0, 0.5],
        help="pauses between a client's requests, one paced run each",
    )
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api_load.md")
    parser.add_argument(
        "--slow-downloads",
        type=int,
        default=0,
        help="run only the slow-downloads case, with this many downloads open",
    )
    parser.add_argument("--requests", type=int, default=200, help="reads of each route in --slow-downloads")
    args = parser.parse_args()

    from greencore.demo import make_demo_model

    tmp = Path(tempfile.mkdtemp(prefix="gt-bench-"))
    make_demo_model(tmp / "models" / "demo-tiny")
    database = f"gt_bench_{secrets.token_hex(6)}"
    prefix = f"gt_bench_{secrets.token_hex(6)}:"
    key = "gt-bench-" + secrets.token_urlsafe(32)
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    env = {k: v for k, v in os.environ.items() if not k.startswith("GT_")}
    env.update(
        GT_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
        GT_BROKER_URL=REDIS_URL,
        GT_BROKER_PREFIX=prefix,
        GT_DATA_DIR=str(tmp / "data"),
        GT_MODELS_DIR=str(tmp / "models"),
        GT_BOOTSTRAP_API_KEY=key,
        GT_DB_POOL_SIZE="20",
        GT_MAX_ACTIVE_JOBS=str(2**31),  # one tenant creates thousands of jobs that no worker takes: no cap
        # the bench's clients share one key: limits far above what they send (the counters still count)
        GT_RATE_LIMIT_KEY_PER_MIN=str(10**9),
        GT_RATE_LIMIT_TENANT_PER_MIN=str(10**9),
    )
    url = f"http://127.0.0.1:{args.port}"
    log_path = tmp / "api.log"
    log = log_path.open("wb")
    greentrainer = Path(sys.executable).parent / "greentrainer"
    proc = subprocess.Popen(
        [
            str(greentrainer),
            "serve",
            "--no-worker",
            "--port",
            str(args.port),
            "--workers",
            str(args.api_workers),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def api_pids() -> list[int]:
        # The API process and its uvicorn workers (children), if any.
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        return [proc.pid, *map(int, children)]

    def api_cpu() -> float:
        return sum(cpu_s(pid) for pid in api_pids())

    try:
        wait_healthy(url, proc, log_path)
        headers = {"Authorization": f"Bearer {key}"}
        lines = "".join(
            json.dumps({"prompt": f"What is {i} plus {i}? ", "completion": f"It is {2 * i}."}) + "\n"
            for i in range(24)
        )
        file_id = httpx.post(
            f"{url}/v1/files", headers=headers, files={"file": ("train.jsonl", lines.encode())}, timeout=60
        ).json()["id"]
        body = {  # OpenAI's body: the hyperparameters under the method object
            "model": "demo-tiny",
            "training_file": file_id,
            "method": {"type": "green", "green": {"hyperparameters": HP}},
        }
        for _ in range(4 * args.api_workers):  # warm every API process's estimate cache
            created = httpx.post(f"{url}/v1/fine_tuning/jobs", headers=headers, json=body, timeout=60)
            assert created.status_code == 200, created.text

        if args.slow_downloads:
            slow_rows, slow_note = run_slow_downloads(
                url,
                args.port,
                key,
                body,
                env["GT_DATABASE_URL"],
                tmp / "data" / "artifacts",
                args.slow_downloads,
                args.requests,
                api_pids,
            )
            write_slow_section(args, slow_rows, slow_note)
            return 0
        commits = probe_commits(database)
        rows: list[str] = []
        all_errors: list[str] = []
        runs = [(f"paced ({p:g} s between requests)", p) for p in args.poll_s] + [
            ("saturated (no pause)", 0.0)
        ]
        for name, poll_s in runs:
            api_before, client_before = api_cpu(), time.process_time()
            record, errors, elapsed = asyncio.run(
                run_load(url, key, body, args.clients, args.seconds, args.polls, poll_s)
            )
            rows += summary_rows(
                name, record, elapsed, api_cpu() - api_before, time.process_time() - client_before
            )
            all_errors += errors
            print("\n".join(rows[-2:]), flush=True)
    finally:
        stop_group(proc)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        r = redis.Redis.from_url(REDIS_URL)
        stale = list(r.scan_iter(f"{prefix}*"))
        if stale:
            r.delete(*stale)

    header = [
        "# API load: 50 concurrent clients creating and polling jobs (PostgreSQL + Redis)",
        "",
        f"Written by `bench/api_load.py` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPU "
        f"cores ({platform.processor() or platform.machine()}), shared by the API, PostgreSQL, Redis and the "
        f"load generator. `greentrainer serve --no-worker` with {args.api_workers} uvicorn process(es); "
        "every job is committed to PostgreSQL and sent to Redis before `POST /v1/fine_tuning/jobs` answers "
        f"(no worker runs, so jobs stay queued). {args.clients} clients, one keep-alive connection each, "
        f"{args.seconds:g} s per run; each client creates a job, then reads it {args.polls} times, then "
        f"creates the next. Latency is measured at the client. Target: p99 under {TARGET_P99_MS:.0f} ms.",
        "",
        "| run | route | requests | per s | p50 ms | p90 ms | p99 ms | max ms | p99 < 100 ms | "
        "server p50 / p99 ms | CPU: API / clients | load avg / CPU pressure |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Errors: {len(all_errors)}" + (f" (first: {all_errors[0]})" if all_errors else "") + ". Server "
        "p50 / p99 is the API process's own time per request (its `Server-Timing` header: from the request "
        "parsed to the answer started), without the time spent in sockets and in the load generator. CPU is "
        "the share of one core the API process(es) and the load generator used during the run; load avg is "
        "the machine's 1-minute load average at the end of the run and CPU pressure the share of the last "
        "minute in which some task was waiting for a CPU (other engineers' work on the machine included).",
        "",
        "The paced runs are the service's intended load: each client polls its job every second, as "
        "`greentrainer jobs create --wait` does, or twice as often. The saturated run sends the next request "
        "the moment the previous answer arrives; its latency is queueing behind the other 49 clients on 2 "
        "cores, and its throughput is the capacity of one API process here.",
        "",
        "`POST /v1/fine_tuning/jobs` does the most work (it reads the file, locks the tenant's row and "
        "counts its active jobs for `GT_MAX_ACTIVE_JOBS`, inserts the job and its events, commits, and "
        "publishes to Redis: nine round trips to PostgreSQL, one to Redis, about 3 ms of the API's CPU), and "
        "its tail follows what the machine leaves it: CPU (the pressure column) and the disk PostgreSQL's "
        "commits wait on. "
        "The tenant's lock is held until the commit, so one tenant's jobs are created one at a time; the "
        "bench's clients all use one key, so a slow commit delays every `POST` behind it. A bare commit of a "
        f"3 KB row (a job's size), measured just before the runs, took {commits}; while other work wrote "
        "model checkpoints, single commits took up to 470 ms. The API does not relax that "
        "(`synchronous_commit` stays on): a job it acknowledged survives a database crash.",
        "",
        "What the API process does about its own tail: uvicorn's access log is off by default "
        "(`GT_ACCESS_LOG`), since a log line written from the event loop stalls every request in flight "
        "whenever the disk is busy; each process loads every model's tokenizer and description before it "
        "freezes its heap out of the garbage collector (`api/warmup.py`), since torch and transformers leave "
        "some 500k long-lived objects that every full collection walks (100-150 ms pauses, each stalling "
        "every request; a freeze taken before the first model was loaded left 200k of them in the way); "
        "dependencies that do no I/O are `async`, and the two routes measured here do their blocking work in "
        "one call on a few threads kept for it (`api/deps.py`: two for reads, one for job creations, whose "
        "estimate may profile a new model for seconds and must not hold up reads): one thread hop per "
        "request where there were seven to nine, and three threads taking turns at the GIL where there were "
        "up to 40 (each thread back from a round trip queues for it behind the others); and the GIL's switch "
        "interval is 1 ms, not 5, so that a thread back from a round trip waits less for it.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(header)
    previous = args.out.read_text() if args.out.exists() else ""
    if SLOW_HEADING in previous:  # the slow-downloads case's section, from its own run, stays
        text = replace_section(text, SLOW_HEADING, previous[previous.find(SLOW_HEADING) :])
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
