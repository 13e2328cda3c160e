"""Can a short run choose the learning rate? (issue 15, item 1: the causal LM the size rule misses)

Run: .venv/bin/python bench/lr_probe.py   (writes bench/results/lr-probe.md)

greencore.lr's rule gives full fine-tuning a rate from the model's size and the batch, and each method a
factor for the share it trains. On the bench's causal LM (pre-trained here for one epoch, far from converged)
every method but LoRA lands 1.1-2.8 points below its grid's choice: the grid wants 20 times the size rule's
rate there. A rule cannot see how converged a checkpoint is; a probe might: train each candidate rate for a
few steps from the base model and keep the one with the lowest dev loss. This bench measures whether such a
probe points where the grids of bench/methods.py point (bench/results/methods*.md: each method's best dev
accuracy after 3 epochs), before anything of the kind goes into the service.

For each task (bench/methods.py's, same files and dev split) and method, every rate of the task's grid trains
`--steps` steps (one epoch over the first steps x 16 rows of the training split, 5 warmup steps, linear decay
to zero, as a run of that length would), and the dev split is evaluated once at the end. The table gives the
dev loss and accuracy per rate and the rate with the lowest dev loss.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.methods import CLS_LABELS, CLS_SIZES, LR_GRID, task_files, write_jsonl  # noqa: E402
from bench.needs import ensure_bench_extra  # noqa: E402
from greencore.spec import Hyperparameters, TrainSpec  # noqa: E402

METHODS = {"full": ("full", {}), "green-0.5": ("green", {"rho": 0.5}), "lora": ("lora", {})}


def probe(model_dir: str, fit: str, dev: str, out: Path, method: str, extra: dict, lr: float, steps: int):
    """(dev loss, dev accuracy) after ``steps`` steps at ``lr`` from the base model."""
    from greencore.train import train

    rows = [line for line in Path(fit).read_text().splitlines() if line.strip()][: steps * 16]
    out.parent.mkdir(parents=True, exist_ok=True)
    part = write_jsonl(out.parent / f"{out.name}.jsonl", [json.loads(r) for r in rows])
    hp = Hyperparameters(batch_size=16, max_seq_len=64, warmup_steps=5, n_epochs=1, learning_rate=lr, **extra)
    report = train(TrainSpec(model_dir, part, str(out), method=method, valid_file=dev, hyperparameters=hp))
    epoch = report.epochs[-1]
    accuracy = epoch.valid_accuracy if epoch.valid_accuracy is not None else epoch.valid_token_accuracy
    return epoch.valid_loss, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/greentrainer-bench"))
    parser.add_argument(
        "--tasks",
        default="classification,topic,verb-topic,generation",
        help=f"of {', '.join(CLS_LABELS)}, generation",
    )
    parser.add_argument("--methods", default="full,green-0.5")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--name", default="lr-probe")
    args = parser.parse_args()
    ensure_bench_extra()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    started, load_before = time.perf_counter(), os.getloadavg()
    lines = []
    for task in args.tasks.split(","):
        # bench/methods.py's files (the causal LM's pre-training is reused when done)
        model_dir, fit, dev, _ = task_files(task, args.work / ("lm" if task == "generation" else task))
        grid = LR_GRID["generation" if task == "generation" else "classification"]
        lines += [f"## {task}", "", "| method | lr | dev loss | dev accuracy |", "|---|---|---|---|"]
        for label in args.methods.split(","):
            method, extra = METHODS[label]
            rates = grid.get(method, grid["default"])
            found = []
            for lr in rates:
                out = args.work / "probe" / task / f"{label}-{lr:g}"
                shutil.rmtree(out, ignore_errors=True)
                loss, accuracy = probe(model_dir, fit, dev, out, method, extra, lr, args.steps)
                print(f"{task} {label} lr {lr:g}: dev loss {loss:.4f} accuracy {accuracy:.4f}", flush=True)
                found.append((loss, lr))
                lines.append(f"| {label} | {lr:g} | {loss:.4f} | {100 * accuracy:.2f}% |")
            lines.append(f"| {label}: lowest dev loss | **{min(found)[1]:g}** | | |")
        lines.append("")
    elapsed = (time.perf_counter() - started) / 60
    text = "\n".join(
        [
            "# A short learning-rate probe against the grids (issue 15, item 1)",
            "",
            f"Command: `.venv/bin/python bench/lr_probe.py {' '.join(sys.argv[1:])}`".rstrip()
            + f" ({elapsed:.1f} min)",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread; "
            f"load average {load_before[0]:.2f} at start, {os.getloadavg()[0]:.2f} at the end. {args.steps} "
            f"steps of batch 16 per rate from the base model (seed 0), then the dev split ({CLS_SIZES[2]} "
            "rows) once; what and why: the docstring of bench/lr_probe.py.",
            "",
            *lines,
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
