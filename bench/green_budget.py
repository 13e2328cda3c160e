"""Where green's budget goes at rho 0.5, and what it would buy with more: the importance batch, free
importance, a larger rho; on bench/methods.py's MiniLM classification tasks.

Run: .venv/bin/python bench/green_budget.py [--tasks pos,topic] [--seeds 0,1,2]
(writes bench/results/green_budget.md; one task per process can run side by side: --tasks pos --name x).

Each row trains for 3 epochs on bench/methods.py's fit split (720 definitions) at a fixed learning rate, the
one bench/methods.py chose on dev at commit 62357a1 (before ``epoch_batches``) for full, green-0.5 (the
rho-0.5 variants) and green-0.6 (``LEARNING_RATES``; later records may choose others), and reports the
validation accuracy (960 definitions) at 3 seeds. Variants (greencore patched in this process only):

- ``first``: importance measured on the shuffle's first batch (greencore before ``epoch_batches``).
- ``median``: greencore as it is: on the batch of median padded size, moved to the front.
- ``free``: as ``median``, but the importance passes charged nothing, so the whole backward budget trains
  (a diagnostic, not a method: its FLOPs, passes included in the table, exceed rho by the passes' cost). If
  the accuracy gap to full were the importance passes' price, this row would close it.
- ``rho-0.6``: greencore at rho 0.6.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import greencore.methods as green_methods  # noqa: E402
from bench.methods import carve_dev, classification_task  # noqa: E402
from greencore.data import epoch_order  # noqa: E402
from greencore.flops import StepFlops  # noqa: E402
from greencore.plan import clear_profile_cache  # noqa: E402
from greencore.spec import EpochReport, Hyperparameters, TrainSpec  # noqa: E402
from greencore.train import train  # noqa: E402

gtrain = sys.modules["greencore.train"]

# The learning rates bench/methods.py chose on dev for full, green-0.5 and green-0.6 (bench/results/methods.md
# and methods-topic.md, recorded at commit 62357a1)
LEARNING_RATES = {"pos": {"full": 1e-4, 0.5: 1e-3, 0.6: 3e-4}, "topic": {"full": 3e-4, 0.5: 3e-3, 0.6: 3e-4}}
VARIANTS = ("first", "median", "free", "rho-0.6")
UNCHARGED: list[int] = []  # importance FLOPs the ``free`` variant did not charge to the budget


@contextlib.contextmanager
def variant(name: str):
    real_order, real_flops = gtrain._order, green_methods.importance_flops
    if name == "first":
        gtrain._order = lambda data, spec, epoch: epoch_order(
            len(data), spec.hyperparameters.batch_size, spec.seed, epoch
        )
    elif name == "free":

        def free(profile, names, n):  # what the passes cost, kept aside: the FLOPs column counts it
            UNCHARGED.append(real_flops(profile, names, n).total)
            return StepFlops(0, 0, 0)

        green_methods.importance_flops = free
    try:
        yield
    finally:
        gtrain._order, green_methods.importance_flops = real_order, real_flops


def run(
    model_dir: str, fit: str, valid: str, out: Path, method: str, lr: float, rho: float | None, seed: int
) -> list[EpochReport]:
    shutil.rmtree(out, ignore_errors=True)
    clear_profile_cache()
    hp = Hyperparameters(
        n_epochs=3, batch_size=16, learning_rate=lr, max_seq_len=64, warmup_steps=10, rho=rho
    )
    reports: list[EpochReport] = []
    UNCHARGED.clear()
    train(
        TrainSpec(
            model_dir,
            fit,
            str(out),
            method=method,
            valid_file=valid,
            hyperparameters=hp,
            seed=seed,
            device="cpu",
        ),
        on_epoch=reports.append,
    )
    shutil.rmtree(out, ignore_errors=True)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="pos,topic")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/greentrainer-budget"))
    parser.add_argument("--name", default="green_budget", help="results file stem")
    args = parser.parse_args()
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = [
        "# Green's budget at rho 0.5: the importance batch, free importance, a larger rho",
        "",
        f"Command: `.venv/bin/python bench/green_budget.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        (__doc__ or "").split("\n\n", 2)[2].strip(),
        "",
    ]
    for task in args.tasks.split(","):
        lrs = LEARNING_RATES[task]
        model_dir, tr, va = classification_task(args.work / task, 960, 960, 0, task)
        fit, _ = carve_dev(tr, 240, 0)
        rhos = [(v, 0.6 if v == "rho-0.6" else 0.5) for v in args.variants.split(",")]
        rows = [("full", "full", lrs["full"], None)] + [(v, "green", lrs[rho], rho) for v, rho in rhos]
        lines += [
            f"## MiniLM, WordNet {task}",
            "",
            "| run | lr | FLOPs / full (mean) | importance FLOPs / full, per epoch (seed 0) | "
            "accuracy: mean | each seed |",
            "|---|---|---|---|---|---|",
        ]
        for label, method, lr, rho in rows:
            accs, ratios, selection = [], [], ""
            for seed in seeds:
                with variant(label if method == "green" else "median"):
                    reports = run(
                        model_dir, fit, va, args.work / f"{task}-{label}-{seed}", method, lr, rho, seed
                    )
                accs.append(100 * reports[-1].valid_accuracy)
                spent = sum(e.flops["total"] for e in reports) + sum(UNCHARGED)
                ratios.append(spent / sum(e.flops["full"] for e in reports))
                if not selection:  # one importance measurement an epoch (``free``: the uncharged one)
                    passes = UNCHARGED or [e.flops["selection"] for e in reports]
                    selection = " / ".join(
                        f"{p / e.flops['full']:.3f}" for p, e in zip(passes, reports, strict=True)
                    )
                print(
                    f"{task} {label} seed {seed}: accuracy {accs[-1]:.2f}, FLOPs/full {ratios[-1]:.3f}",
                    flush=True,
                )
            lines.append(
                f"| {label} | {lr:g} | {statistics.mean(ratios):.3f} | {selection} | "
                f"{statistics.mean(accs):.2f}% | {' / '.join(f'{a:.2f}' for a in accs)} |"
            )
        lines.append("")
    lines.append(f"({(time.perf_counter() - started) / 60:.1f} min)")
    out = ROOT / "bench" / "results" / f"{args.name}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
