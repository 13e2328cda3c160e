"""``greentrainer train --config run.yaml``: one training run on this machine, without the service.

It runs ``greencore.train.train``, the function the worker runs a job with, on the TrainSpec the config file
holds (greencore.run_config), with a progress bar on stderr, a checkpoint per epoch (``epoch-N/``, then
``final/``) and ``epochs.jsonl`` (one EpochReport per line, written as each epoch is checkpointed) in the
output folder. Ctrl-C stops the run before its next step, keeping the last checkpoint; ``--resume`` goes on
from it, exactly as if the run had never stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from greencore.spec import EpochReport, TrainSpec

EPOCHS_FILE = "epochs.jsonl"  # in the output folder: one EpochReport.as_dict() per line, epoch order
EXIT_BAD_INPUT = 2  # a config, a dataset, a model folder or a checkpoint that cannot run (as `profile`)
EXIT_STOPPED = 130  # Ctrl-C: stopped before the next step, the last checkpoint kept (128 + SIGINT)


def add_train_command(sub: Any) -> None:
    """Add ``train`` to the ``greentrainer`` subcommands."""
    p = sub.add_parser(
        "train",
        help="run a training run from a config file (YAML or JSON of a TrainSpec) on this machine",
        description=(__doc__ or "").replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", required=True, help="a .yaml, .yml or .json file of a TrainSpec (docs/train.md)"
    )
    p.add_argument("--output-dir", default=None, help="instead of the config's output_dir (from this folder)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on from the last complete epoch-N in the output folder (from the start when there is none)",
    )
    p.add_argument("--device", default=None, help="instead of the config's device: cpu, cuda, cuda:1")
    p.add_argument(
        "--nproc", type=int, default=1, help="ranks on this machine (torchrun; gloo on CPU, NCCL on CUDA)"
    )
    p.add_argument("--nnodes", type=int, default=1, help="machines the run spans (each runs this command)")
    p.add_argument(
        "--node-rank", type=int, default=0, help="this machine's rank among --nnodes (0: at --rdzv-endpoint)"
    )
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of machine 0, where the ranks meet")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    """The ``train`` command: Ctrl-C asks the run to stop before its next step (a second one interrupts)."""
    stop = []

    def on_sigint(signum: int, frame: Any) -> None:
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        print("\nstopping before the next step (Ctrl-C again to interrupt)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return run_train(args, should_stop=lambda: bool(stop))
    finally:
        signal.signal(signal.SIGINT, previous)


def run_train(args: argparse.Namespace, should_stop: Callable[[], bool] | None = None) -> int:
    """Run the config of ``args``; the exit status: 0 when every epoch ran, 130 when ``should_stop`` ended
    the run early (its last checkpoint kept), 2 on input that cannot run (``error: ...`` on stderr)."""
    from transformers.utils import logging as transformers_logging

    from greencore.checkpoint import CheckpointError, CheckpointWriteError
    from greencore.data import DatasetError
    from greencore.models import ModelFolderError
    from greencore.registry import MethodError
    from greencore.select import BudgetTooSmall
    from greencore.spec import SpecError
    from greencore.train import LossNotFinite, train

    transformers_logging.disable_progress_bar()  # its loading and saving bars would break up the epoch lines
    if args.nproc < 1 or args.nnodes < 1:
        print("error: --nproc must be at least 1 (and --nnodes too)", file=sys.stderr)
        return EXIT_BAD_INPUT
    launch = _multi_rank(args) and "WORLD_SIZE" not in os.environ
    leader = int(os.environ.get("RANK", "0")) == 0  # a rank of torchrun's, or the only process
    try:
        spec = _spec_of(args)
        if launch:  # the config is read and checked here first: bad input exits 2 before any rank starts
            return _launch_ranks(args)
        records = EpochRecords(Path(spec.output_dir) / EPOCHS_FILE) if leader else None
        progress = Progress(spec.hyperparameters.n_epochs)
        try:
            report = train(
                spec,
                on_epoch=lambda epoch: (records and records.add(epoch), progress.epoch_done(epoch)),
                should_stop=should_stop,
                on_step=progress.step,
            )
        finally:
            progress.close()
            _wait_for_every_rank()
        if records is not None:
            records.finish(report.epochs)
    except (
        SpecError,
        DatasetError,
        ModelFolderError,
        MethodError,
        BudgetTooSmall,
        CheckpointError,
        LossNotFinite,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CheckpointWriteError as exc:  # a full disk: the previous checkpoint is intact
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if report.stopped:
        last = report.epochs[-1].checkpoint_dir if report.epochs else None
        kept = f"last checkpoint {last}" if last else "no epoch completed"
        if leader:
            print(f"stopped: {kept}; go on with --resume", file=sys.stderr)
        return EXIT_STOPPED
    if records is not None:
        print(f"final checkpoint: {report.final_checkpoint_dir}")
        print(f"epoch records: {records.path}")
    return 0


def _multi_rank(args: argparse.Namespace) -> bool:
    return args.nproc > 1 or args.nnodes > 1


def _launch_ranks(args: argparse.Namespace) -> int:
    """Run this command as ``--nproc`` ranks per machine through torchrun: on one machine with
    ``--standalone``; on several with a static rendezvous at ``--rdzv-endpoint`` (this machine ``--node-rank``
    of ``--nnodes``). Returns torchrun's exit status."""
    import subprocess

    if args.nnodes > 1 and args.rdzv_endpoint is None:
        print("error: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (rank 0's machine)", file=sys.stderr)
        return EXIT_BAD_INPUT
    rank_args = ["-m", "api.cli", "train", "--config", str(Path(args.config).resolve())]
    if args.output_dir is not None:
        rank_args += ["--output-dir", str(Path(args.output_dir).resolve())]
    if args.resume:
        rank_args.append("--resume")
    if args.device is not None:
        rank_args += ["--device", args.device]
    cmd, env = torchrun_command(args.nproc, rank_args, args.nnodes, args.node_rank, args.rdzv_endpoint)
    return subprocess.run(cmd, env=env, check=False).returncode


def torchrun_command(
    nproc: int,
    rank_args: list[str],
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run ``python rank_args...`` as ``nproc`` ranks on this machine through
    torchrun (``torch.distributed.run``), the one launch of ``greentrainer train --nproc`` and of a worker
    with GT_WORKER_NPROC > 1: ``--standalone`` on one machine (gloo's ranks then talk over loopback:
    GLOO_SOCKET_IFNAME=lo unless set), a static rendezvous at ``rdzv_endpoint`` on several. torchrun gives
    each rank one thread (OMP_NUM_THREADS=1) unless the environment sets another number."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    env = dict(os.environ)
    if nnodes == 1:
        cmd.append("--standalone")
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    else:
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank)]
        cmd += ["--rdzv-backend", "static", "--rdzv-endpoint", str(rdzv_endpoint)]
    return [*cmd, *rank_args], env


def _wait_for_every_rank() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank is done with the group: the processes exit with it


def _spec_of(args: argparse.Namespace) -> TrainSpec:
    """The config's TrainSpec with the command line's overrides; with ``--resume``, ``resume_from`` the last
    complete epoch in the output folder (the config's own ``resume_from`` when there is none)."""
    from greencore.run_config import read_run_config
    from greencore.spec import SpecError

    overrides = {"output_dir": args.output_dir, "device": args.device}
    spec = read_run_config(args.config, {k: v for k, v in overrides.items() if v is not None})
    _check_device(spec.device)
    last = last_epoch_dir(spec.output_dir)
    if args.resume:
        if last is not None:
            spec.resume_from = str(last)
            print(f"resuming from {last}", file=sys.stderr)
        elif spec.resume_from is None:
            print(f"no checkpoint in {spec.output_dir}: starting from epoch 1", file=sys.stderr)
    elif last is not None and spec.resume_from is None:
        # A fresh run would write over this run's checkpoints and records one epoch at a time.
        raise SpecError(
            "output_dir",
            f"{spec.output_dir} already holds checkpoints ({last.name}): "
            "go on with --resume, or give another --output-dir",
        )
    return spec


def _check_device(device: str | None) -> None:
    import torch

    from greencore.spec import SpecError

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise SpecError("device", f"{device!r} is not a device: {exc}") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise SpecError("device", f"{device!r}: CUDA is not available on this machine")


def last_epoch_dir(output_dir: str | Path) -> Path | None:
    """The complete ``epoch-N`` checkpoint of largest N in ``output_dir`` (None when there is none).
    Checkpoints are renamed into place once written, so any ``epoch-N`` holding its state is complete."""
    from greencore.checkpoint import STATE_FILE

    found = []
    for folder in Path(output_dir).glob("epoch-*"):
        number = folder.name.removeprefix("epoch-")
        if number.isdigit() and (folder / STATE_FILE).is_file():
            found.append((int(number), folder))
    return max(found)[1] if found else None


class EpochRecords:
    """``epochs.jsonl``: one line per epoch, appended and fsync'd as the epoch is checkpointed, so it is on
    disk before the next epoch starts. A resumed run's first epoch N rewrites the file with the lines of
    epochs before N only, one per epoch (the last written), dropping what an interrupted run wrote past its
    checkpoint; the end of the run (stopped or not) rewrites it from the records the run returns, so that
    every epoch is there exactly once. Nothing is written before the first epoch: a run refused at setup
    leaves the folder as it was."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = False

    def add(self, report: EpochReport) -> None:
        if not self.started:
            self.started = True
            self._rewrite([*self._written_before(report.epoch), report.as_dict()])
            return
        with open(self.path, "a") as handle:
            handle.write(_line(report.as_dict()))
            handle.flush()
            os.fsync(handle.fileno())

    def finish(self, reports: list[EpochReport]) -> None:
        """Rewrite the file from ``reports``: every epoch of the run, those before a resume included."""
        self._rewrite([r.as_dict() for r in reports])

    def _written_before(self, epoch: int) -> list[dict[str, Any]]:
        """The file's records of the epochs before ``epoch``, the last line of each, in epoch order."""
        found: dict[int, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                    found[record["epoch"]] = record
        return [found[n] for n in sorted(found) if n < epoch]

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        from greencore.durable import fsync_dir

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as handle:
            handle.writelines(_line(record) for record in records)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.path)
        fsync_dir(self.path.parent)


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, default=str) + "\n"


class Progress:
    """A bar of the epoch's steps on stderr (tqdm; drawn only on a terminal) and one line per epoch."""

    def __init__(self, n_epochs: int) -> None:
        self.n_epochs = n_epochs
        self.bar: Any = None
        self.bar_epoch = 0

    def step(self, epoch: int, step: int, steps_in_epoch: int) -> None:
        from tqdm import tqdm  # a dependency of transformers

        if self.bar is None or self.bar_epoch != epoch:
            self.close()
            self.bar = tqdm(
                total=steps_in_epoch,
                desc=f"epoch {epoch}/{self.n_epochs}",
                unit="step",
                file=sys.stderr,
                disable=None,  # no bar when stderr is not a terminal (logs, pipes)
                leave=False,
            )
            self.bar_epoch = epoch
        self.bar.n = step
        self.bar.refresh()

    def epoch_done(self, report: EpochReport) -> None:
        self.close()
        print(epoch_line(report, self.n_epochs), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def epoch_line(report: EpochReport, n_epochs: int) -> str:
    """One line of an epoch's record: losses, accuracy, rho_achieved, FLOPs, time and energy, with units."""

    def number(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    accuracy = report.valid_accuracy if report.valid_accuracy is not None else report.valid_token_accuracy
    return (
        f"epoch {report.epoch}/{n_epochs}  train_loss {number(report.train_loss, '.4f')}  "
        f"valid_loss {number(report.valid_loss, '.4f')}  accuracy {number(accuracy, '.4f')}  "
        f"rho_achieved {report.rho_achieved:.3f}  flops {report.flops['total']:.3e}  "
        f"wall_s {report.wall_s:.1f}  energy_j {report.energy_j:.1f} ({report.energy_method})"
    )
