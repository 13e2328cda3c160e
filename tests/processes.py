"""The service as real processes, for end-to-end tests, browser tests and benchmarks: a free port, an
environment without the caller's GT_* settings, a process group started and always stopped with its children
(the embedded worker), and a wait for ``GET /health``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without GT_* settings, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GT_")}
    return {**env, **values}


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL what is left (children of a leader that already exited too)."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own group, stopped with its children at the end; its output goes to ``log``."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            stop_group(proc)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    """Until ``url``/health answers 200; fails with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"no answer from {url}/health:\n{log.read_text()[-3000:]}")


def rank_processes(parent: int | None = None) -> list[psutil.Process]:
    """The ranks of a worker's jobs (``python -m worker.ranks``, torchrun's children) below process ``parent``
    (default: this one)."""
    found = []
    for proc in psutil.Process(parent).children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:  # ended meanwhile
            continue
        if "worker.ranks" in cmdline and "torch.distributed.run" not in cmdline:
            found.append(proc)
    return found
