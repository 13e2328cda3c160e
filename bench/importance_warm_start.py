"""Importance's tentative step: a fresh AdamW (old) against a copy of the training optimizer (new), on
bench/methods.py's MiniLM classification (WordNet parts of speech).

Run: .venv/bin/python bench/importance_warm_start.py   (writes bench/results/importance_warm_start.md)

Variants of the optimizer factory greencore.train hands to the green method (patched in for each run):

- old: a fresh AdamW at the peak learning rate (hp.learning_rate), as greencore.train built it before.
- fresh-sched: a fresh AdamW at the learning rate the scheduler set for the next step (isolates the lr).
- warm: greencore.importance.tentative_optimizer_factory: the training optimizer's class and current group
  hyperparameters (scheduled lr), state seeded with a clone of the training state (greencore's default since
  issue 4; see bench/results/importance_warm_start.md).
- warm-peak: like warm, at the peak learning rate.

Importance itself is greencore's (the trapezoid rule since issue 4; the runs recorded before it used the
first-order rule).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.methods import Run, classification_task, run_interleaved, summarize  # noqa: E402
from greencore.importance import tentative_optimizer_factory  # noqa: E402

# `greencore.train` the attribute is the train() function (greencore/__init__ exports it): patch the module.
gtrain = sys.modules["greencore.train"]


@contextlib.contextmanager
def patched_factory(make):
    """greencore.train runs with its importance optimizer factory replaced by ``make(training_optimizer)``.

    train() builds a LambdaLR scheduler over its training optimizer (caught here), then an EpochContext each
    epoch (built here with the variant's factory over that optimizer).
    """
    real_scheduler, real_context = gtrain.torch.optim.lr_scheduler.LambdaLR, gtrain.EpochContext
    caught: list[torch.optim.Optimizer] = []

    def scheduler(optimizer, *args, **kwargs):
        caught.append(optimizer)
        return real_scheduler(optimizer, *args, **kwargs)

    def context(**kwargs):
        return real_context(**{**kwargs, "optimizer_factory": make(caught[-1])})

    gtrain.torch.optim.lr_scheduler.LambdaLR, gtrain.EpochContext = scheduler, context
    try:
        yield
    finally:
        gtrain.torch.optim.lr_scheduler.LambdaLR, gtrain.EpochContext = real_scheduler, real_context


def old(opt):
    return lambda ps: torch.optim.AdamW(ps, lr=opt.defaults["lr"], weight_decay=opt.defaults["weight_decay"])


def fresh_sched(opt):
    return lambda ps: torch.optim.AdamW(
        ps, lr=opt.param_groups[0]["lr"], weight_decay=opt.defaults["weight_decay"]
    )


def warm_peak(opt):
    def factory(ps):
        o = tentative_optimizer_factory(opt)(ps)
        for g in o.param_groups:
            g["lr"] = opt.defaults["lr"]
        return o

    return factory


VARIANTS = {
    "old": old,
    "warm": tentative_optimizer_factory,
    "fresh-sched": fresh_sched,
    "warm-peak": warm_peak,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/greentrainer-warm"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rhos", default="0.5,0.7")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "importance_warm_start.md")
    args = parser.parse_args()
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model_dir, tr, va = classification_task(args.work / f"cls-{args.epochs}", 960, 480, 0)
    hp = {"batch_size": 16, "max_seq_len": 64, "warmup_steps": 10}
    lr = {"default": args.lr}
    rhos = [float(r) for r in args.rhos.split(",")]
    all_runs: list[tuple[str, Run]] = []
    print("full", flush=True)
    full = run_interleaved(
        model_dir,
        tr,
        va,
        args.work / f"e{args.epochs}-lr{args.lr:g}-full",
        hp,
        lr,
        args.epochs,
        0,
        args.device,
        methods=[("full", "full", {})],
    )
    all_runs.append(("-", full[0]))
    for name in args.variants.split(","):
        print(name, flush=True)
        with patched_factory(VARIANTS[name]):
            runs = run_interleaved(
                model_dir,
                tr,
                va,
                args.work / f"e{args.epochs}-lr{args.lr:g}-{name}",
                hp,
                lr,
                args.epochs,
                0,
                args.device,
                methods=[(f"green-{r}", "green", {"rho": r}) for r in rhos],
            )
        all_runs += [(name, r) for r in runs]
    rows = summarize([r for _, r in all_runs])
    lines = [
        "| factory | method | FLOPs / full | accuracy | valid loss | tensors trained per epoch | "
        "train time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, run), row in zip(all_runs, rows, strict=True):
        per_epoch = "/".join(str(len(e.selected_tensors)) for e in run.epochs)
        lines.append(
            f"| {name} | {row.label} | {row.flops_ratio:.3f} | {row.accuracy:.2%} | {row.valid_loss:.4f} | "
            f"{per_epoch} | {row.train_s:.1f} |"
        )
    text = "\n".join(
        [
            f"### {args.epochs} epochs, lr {args.lr:g} ({(time.perf_counter() - started) / 60:.1f} min)",
            "",
            f"Command: `.venv/bin/python bench/importance_warm_start.py {' '.join(sys.argv[1:])}`",
            "",
            *lines,
            "",
        ]
    )
    print(text)
    with args.out.open("a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
