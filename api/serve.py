"""``greentrainer serve``: migrate, make sure a model and a key exist, start a worker, serve the API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from api.config import Settings
from api.db import make_session_factory
from api.keys import DEFAULT_TENANT, create_key
from api.migrate import upgrade

KEY_FILE = "api-key"  # under GT_DATA_DIR on the embedded default: the local key, shown at every start
WORKER_STOP_S = 15.0  # a worker gets this long to hand back its job before it is killed


def ensure_demo_model(settings: Settings) -> Path | None:
    """Create the demo model in GT_MODELS_DIR when it holds no model; returns its folder (None: not
    needed)."""
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    if any((p / "config.json").is_file() for p in settings.models_dir.iterdir() if p.is_dir()):
        return None
    from greencore.demo import make_demo_model

    try:
        return make_demo_model(settings.models_dir / settings.demo_model)
    except OSError as exc:  # a read-only models volume: the operator provides the models
        print(
            f"warning: GT_MODELS_DIR holds no model and the demo model cannot be written: {exc}", flush=True
        )
        return None


def local_api_key(settings: Settings) -> str | None:
    """The key to print at start: GT_BOOTSTRAP_API_KEY, else (embedded default only) a key of tenant
    ``default`` kept in GT_DATA_DIR/api-key, created on first start."""
    if settings.bootstrap_api_key is not None:
        return settings.bootstrap_api_key.get_secret_value()
    if not settings.embedded:
        return None
    path = settings.data_dir / KEY_FILE
    if path.is_file():
        return path.read_text().strip()
    sessions = make_session_factory(settings)
    with sessions() as session:
        key = create_key(session, DEFAULT_TENANT, name="local")
    sessions.kw["bind"].dispose()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


def start_worker() -> subprocess.Popen[bytes]:
    """One worker process (``python -m worker``) with this process's environment and folder."""
    return subprocess.Popen([sys.executable, "-m", "worker"])


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM), then SIGKILL after WORKER_STOP_S."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(WORKER_STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _exit(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def serve(settings: Settings, host: str, port: int, with_worker: bool = True, workers: int = 1) -> int:
    """Run the service until interrupted; returns an exit status."""
    import uvicorn

    settings.ensure_dirs()
    upgrade(settings.database_url)
    demo = ensure_demo_model(settings)
    if demo is not None:
        print(f"created the demo model {demo.name} in {demo.parent}", flush=True)
    key = local_api_key(settings)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}"
    print(f"GreenTrainer is serving on {url} (API docs: {url}/docs)", flush=True)
    if key is not None:
        print(f"API key (tenant {DEFAULT_TENANT}): {key}", flush=True)
    else:
        print("create an API key with: greentrainer keys create --tenant NAME", flush=True)
    # uvicorn handles SIGTERM, then raises it again once it has stopped: make that an exit that runs
    # `finally`.
    signal.signal(signal.SIGTERM, _exit)
    worker = start_worker() if with_worker else None
    try:
        # Off by default: a log line written from the event loop per request stalls every request when the
        # disk is busy (bench/results/api_load.md); a proxy in front logs requests better.
        # Behind a proxy, the client's address (what failed authentications are counted by) comes from
        # X-Forwarded-For, trusted only from GT_FORWARDED_ALLOW_IPS: from anyone else it could be forged.
        options = {
            "host": host,
            "port": port,
            "access_log": settings.access_log,
            "proxy_headers": True,
            "forwarded_allow_ips": settings.forwarded_allow_ips,
        }
        if workers > 1:
            uvicorn.run("api.app:create_app", factory=True, workers=workers, **options)
        else:
            from api.app import create_app

            uvicorn.run(create_app(settings), **options)
    finally:
        if worker is not None:
            stop_worker(worker)
    return 0
