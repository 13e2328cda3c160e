"""A job on several ranks: a worker with GT_WORKER_NPROC > 1 runs ``greencore.train`` as that many torchrun
ranks on its machine (one per GPU with NCCL; gloo processes on a CPU), launched as ``greentrainer train
--nproc`` launches them (api.cli_train.torchrun_command).

The worker process stays the job's only writer: it keeps the heartbeat, reads cancels and writes every
record (worker/recorder.py), as for a run in its own process. The ranks never open the database; they talk to
the worker through files in ``<attempt folder>/.ranks/``:

    spec.json       the TrainSpec, written by the worker
    epochs.jsonl    each EpochReport, appended by rank 0 once its checkpoint is written (api.cli_train's
                    EpochRecords); the worker records each epoch as it appears, once
    progress.json   rank 0's latest step, which the worker reports as the run's progress (and watchdog)
    stop            created by the worker when the job must stop (cancelled, taken over): every rank checks
                    it before each step, and greencore's stop is decided together, so all stop at one step
    report.json     rank 0's TrainReport, at the end
    error-<r>.json  the error (code, message) that ended rank r

A rank that ends without an error of its own (killed, killed by the kernel's OOM killer, crashed) makes
torchrun stop the others; the worker then raises :class:`RankLost` and hands the job back as it does for a
lost worker (worker/runner.py): it resumes from its last recorded epoch. Nothing waits forever: a rank left
alone in a collective fails after GT_DIST_TIMEOUT_S, torchrun and the ranks die with their parent
(PR_SET_PDEATHSIG), and a run with no step for GT_STALL_TIMEOUT_S is killed by the worker's watchdog.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from greencore.spec import EnergySettings, EpochReport, Hyperparameters, TrainReport, TrainSpec

log = logging.getLogger(__name__)

RUN_DIR = ".ranks"  # in the attempt's folder
SPEC_FILE = "spec.json"
PROGRESS_FILE = "progress.json"
STOP_FILE = "stop"
REPORT_FILE = "report.json"
POLL_S = 0.2  # how often the worker reads the ranks' files
PROGRESS_EVERY_S = 0.2  # rank 0 writes its progress at most this often (and at an epoch's last step)
TERMINATE_GRACE_S = 40.0  # torchrun's own shutdown of its ranks takes up to 30 s before it kills them
PR_SET_PDEATHSIG = 1  # prctl(2)


class RankLost(RuntimeError):
    """A rank ended without an error of its own (a signal, the OOM killer, a crash): the job's worker is as
    good as lost."""


class RankError(RuntimeError):
    """A rank's training error, as worker.failures names it: ``code`` and ``message`` (with paths)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- the worker's side ---------------------------------------------------------------------------------------


def train_on_ranks(
    spec: TrainSpec,
    nproc: int,
    on_epoch: Callable[[EpochReport], None],
    should_stop: Callable[[], bool],
    on_step: Callable[[int, int, int], None],
) -> TrainReport:
    """``greencore.train.train(spec, on_epoch, should_stop, on_step)`` as ``nproc`` torchrun ranks; the
    callbacks run in this process. Raises RankError (a rank's training error), RankLost (a rank died), or
    what a callback raised (the ranks are stopped first)."""
    from api.cli_train import EPOCHS_FILE, torchrun_command

    run_dir = Path(spec.output_dir) / RUN_DIR
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(spec), default=str))
    cmd, env = torchrun_command(nproc, ["-m", "worker.ranks", str(run_dir)])
    epochs = EpochFeed(run_dir / EPOCHS_FILE)
    progress = None
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_die_with_parent(signal.SIGTERM),  # torchrun then stops its ranks
    )
    tail: collections.deque[str] = collections.deque(maxlen=200)  # torchrun's summary of failures is in it
    output = _forward(proc, tail)
    try:
        while True:
            returncode = proc.poll()
            for report in epochs.new():
                on_epoch(report)
            if returncode is not None:
                break
            now = _read_json(run_dir / PROGRESS_FILE)
            if now is not None and now != progress:
                progress = now
                on_step(now["epoch"], now["step"], now["steps_in_epoch"])
            if should_stop() and not (run_dir / STOP_FILE).exists():
                (run_dir / STOP_FILE).touch()
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:  # a callback raised (a refused write): the ranks must not go on
            (run_dir / STOP_FILE).touch()
            _terminate(proc)
        output.join(10)
    try:
        return outcome_of(run_dir, returncode, list(tail))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


class EpochFeed:
    """The EpochReports rank 0 appends to ``path``, each handed out once, in epoch order (a line cut short
    by a kill, or not yet whole, is read again at the next call)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last = 0

    def new(self) -> list[EpochReport]:
        if not self.path.is_file():
            return []
        found = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("epoch", 0) > self.last:
                found.append(EpochReport(**record))
                self.last = record["epoch"]
        return found


def outcome_of(run_dir: Path, returncode: int, tail: list[str]) -> TrainReport:
    """The run's TrainReport once torchrun exited with ``returncode`` (0), or why it failed.

    A rank ended by a signal other than the SIGTERM with which torchrun stops the survivors (SIGKILL: killed,
    or the kernel's OOM killer; SIGSEGV: a crash) is the cause, whatever errors the others then raised in a
    collective: RankLost. Otherwise the first error a rank wrote is the run's (RankError), and ranks that
    ended with none make it RankLost."""
    signalled = {
        rank: code for rank, code in _exit_codes(tail).items() if code < 0 and code != -signal.SIGTERM
    }
    if signalled:
        rank, code = min(signalled.items())
        raise RankLost(f"rank {rank} was killed by {signal.Signals(-code).name}")
    errors = [_read_json(path) for path in run_dir.glob("error-*.json")]
    errors = [e for e in errors if e is not None]
    if errors:
        first = min(errors, key=lambda e: e["time"])
        raise RankError(first["code"], first["message"])
    report = _read_json(run_dir / REPORT_FILE) if returncode == 0 else None
    if report is None:
        how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"status {returncode}"
        raise RankLost(f"the ranks ended ({how}) with no error and no report")
    epochs = [EpochReport(**e) for e in report.pop("epochs")]
    return TrainReport(epochs=epochs, **report)


def _exit_codes(tail: list[str]) -> dict[int, int]:
    """Each failed rank's exit status (negative: the signal) from torchrun's summary of failures."""
    found = re.findall(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", "\n".join(tail))
    return {int(rank): int(code) for rank, code in found}


def _forward(proc: subprocess.Popen[str], tail: collections.deque[str]) -> threading.Thread:
    """A started thread copying the ranks' output into this process's log, its last lines into ``tail``."""

    def copy() -> None:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            log.info("ranks: %s", tail[-1])

    thread = threading.Thread(target=copy, name="ranks-output", daemon=True)
    thread.start()
    return thread


def _terminate(proc: subprocess.Popen[str]) -> None:
    """Stop torchrun, which stops its ranks (SIGTERM, then SIGKILL after its grace); kill it past ours (the
    ranks then die with it)."""
    proc.terminate()
    try:
        proc.wait(TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _die_with_parent(sig: int) -> Any:
    """A ``preexec_fn`` that has the child sent ``sig`` when the thread that started it ends (the worker
    killed by its watchdog, or by anything else); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig))

    return set_signal


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, default=str))
    tmp.replace(path)


# -- a rank's side -------------------------------------------------------------------------------------------


def spec_of(data: dict[str, Any]) -> TrainSpec:
    """The TrainSpec ``dataclasses.asdict`` made ``data`` of."""
    hp = Hyperparameters(**data["hyperparameters"])
    return TrainSpec(**{**data, "hyperparameters": hp, "energy": EnergySettings(**data["energy"])})


def rank_main(run_dir: Path) -> int:
    """One rank of a worker's job (torchrun's environment): train the spec in ``run_dir``; 0 when the run
    ended (stopped or not), 1 on a training error (written to ``error-<rank>.json``)."""
    from transformers.utils import logging as transformers_logging

    from api.cli_train import EPOCHS_FILE, EpochRecords
    from greencore.train import train
    from worker.failures import error_of

    transformers_logging.disable_progress_bar()  # the worker's log gets the ranks' output, line by line

    ctypes_prctl = _die_with_parent(signal.SIGKILL)
    if ctypes_prctl is not None:
        ctypes_prctl()  # torchrun gone (killed with the worker): this rank goes too
        if os.getppid() == 1:
            return 1
    rank = int(os.environ.get("RANK", "0"))
    stop_file = run_dir / STOP_FILE
    records = EpochRecords(run_dir / EPOCHS_FILE) if rank == 0 else None
    written = [0.0]

    def on_step(epoch: int, step: int, steps_in_epoch: int) -> None:
        now = time.monotonic()
        if now - written[0] >= PROGRESS_EVERY_S or step == steps_in_epoch:
            written[0] = now
            _write_json(
                run_dir / PROGRESS_FILE, {"epoch": epoch, "step": step, "steps_in_epoch": steps_in_epoch}
            )

    try:
        spec = spec_of(json.loads((run_dir / SPEC_FILE).read_text()))
        report = train(
            spec,
            on_epoch=records.add if records is not None else None,
            should_stop=stop_file.exists,
            on_step=on_step,
        )
    except Exception as exc:
        log.exception("rank %d failed", rank)
        code, message = error_of(exc)
        # The first error written is the run's: others may follow from it (a peer gone mid-collective).
        error = {"code": code, "message": message, "time": time.time()}
        _write_json(run_dir / f"error-{rank}.json", error)
        return 1
    if rank == 0:
        _write_json(run_dir / REPORT_FILE, report.as_dict())
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(rank_main(Path(sys.argv[1])))
