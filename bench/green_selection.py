"""What green selects, epoch by epoch: each candidate's importance, its FLOPs, and whether it trained.

Run: .venv/bin/python bench/green_selection.py --lr 1e-3 --rho 0.5 [--rule first_order] [--factory fresh]
(prints; writes nothing). Setting: bench/methods.py's MiniLM classification (960 train / 480 valid, batch 16,
max_seq_len 64, 10 warmup steps, seed 0), CPU, 1 thread.

- ``--rule``: the importance estimate, greencore's ``trapezoid`` (default) or the paper's ``first_order``.
- ``--factory``: the tentative step, greencore's ``warm`` (a copy of the training optimizer: moments and the
  scheduled lr; default) or ``fresh`` (a fresh AdamW at the peak lr, greencore's choice before issue 4).

Per epoch: the validation accuracy, how many candidates read <= 0, the selection's FLOPs split (shares of full
fine-tuning's epoch), then the candidates by importance, `*` for those trained, with the activation-gradient
(`act`) and weight-gradient (`w`) FLOPs a step training that tensor alone adds, as shares of full's step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import greencore.methods as green_methods  # noqa: E402
from bench.importance_warm_start import VARIANTS, patched_factory  # noqa: E402
from bench.methods import classification_task  # noqa: E402
from greencore.spec import EpochReport, Hyperparameters, TrainSpec  # noqa: E402
from greencore.train import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rule", choices=("trapezoid", "first_order"), default="trapezoid")
    parser.add_argument("--factory", choices=("warm", "fresh"), default="warm")
    parser.add_argument("--show", type=int, default=20, help="candidates printed per epoch")
    parser.add_argument("--work", type=Path, default=Path("/tmp/greentrainer-selection"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)

    model_dir, tr, va = classification_task(args.work / "cls", 960, 480, 0)
    seen: dict = {}
    real_importance, real_select = green_methods.importance_pass, green_methods.select_tensors

    def importance(*a, **k):
        measured = functools.partial(real_importance, rule=args.rule)(*a, **k)
        seen["importance"] = measured.scores
        return measured

    def select(profile, *a, **k):
        seen["profile"] = profile
        return real_select(profile, *a, **k)

    def on_epoch(e: EpochReport) -> None:
        print(
            f"epoch {e.epoch}: rho {e.rho_achieved:.3f}, train loss {e.train_loss}, valid accuracy "
            f"{e.valid_accuracy:.4f}, {len(e.selected_tensors)} tensors trained",
            flush=True,
        )
        scores, profile = seen.pop("importance", None), seen.get("profile")
        if scores is None:
            return
        full = profile.full.total
        cost = profile.step_flops(e.selected_tensors)
        print(
            f"  {sum(v <= 0 for v in scores.values())} of {len(scores)} candidates <= 0; epoch FLOPs / full: "
            f"fwd {cost.fwd / full:.3f}, act {cost.bwd_act / full:.3f}, weight {cost.bwd_weight / full:.3f}, "
            f"selection {e.flops['selection'] / e.flops['full']:.3f}"
        )
        chosen = set(e.selected_tensors)
        for name, value in sorted(scores.items(), key=lambda kv: -kv[1])[: args.show]:
            one = profile.step_flops([name])
            print(
                f"   {'*' if name in chosen else ' '} {value:+.3e}  act {one.bwd_act / full:.4f}  "
                f"w {one.bwd_weight / full:.5f}  {name}"
            )

    green_methods.importance_pass, green_methods.select_tensors = importance, select
    out = args.work / f"run-{args.rule}-{args.factory}-{args.lr:g}-{args.rho:g}"
    shutil.rmtree(out, ignore_errors=True)
    hp = Hyperparameters(
        n_epochs=args.epochs,
        batch_size=16,
        learning_rate=args.lr,
        max_seq_len=64,
        warmup_steps=10,
        rho=args.rho,
    )
    fresh = patched_factory(VARIANTS["old"]) if args.factory == "fresh" else contextlib.nullcontext()
    with fresh:
        train(
            TrainSpec(
                model_dir,
                tr,
                str(out),
                method="green",
                valid_file=va,
                hyperparameters=hp,
                seed=0,
                device="cpu",
            ),
            on_epoch=on_epoch,
        )


if __name__ == "__main__":
    main()
