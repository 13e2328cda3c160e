"""Green on small datasets: rho_min by setting, the refusal's advice, and a whole run's FLOPs.

Run: .venv/bin/python bench/small_data.py   (writes bench/results/small-data.md; about a minute on 2 cores)

The demo Llama (greencore.demo) on chat datasets of 24 and 64 examples (tests.model_folders.dataset),
max_seq_len 96, seed 0: rho_min as the estimate computes it (greencore.estimate.run_costs) for the automatic
reselect_every, selection every epoch, and importance on 2 rows of each batch; the message of a refused job;
and greencore.train of 24 examples at batch 8, rho 0.5, three epochs, epoch by epoch.
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from greencore.data import encode_dataset, validate_dataset  # noqa: E402
from greencore.demo import build_tokenizer  # noqa: E402
from greencore.estimate import run_costs  # noqa: E402
from greencore.select import BudgetTooSmall  # noqa: E402
from greencore.spec import EnergySettings, Hyperparameters, TrainSpec  # noqa: E402
from greencore.train import train  # noqa: E402
from tests.model_folders import dataset, model_folder, write_jsonl  # noqa: E402

CASES = (  # (examples, batch_size, n_epochs)
    (24, 8, 3),
    (24, 8, 1),
    (24, 4, 3),
    (64, 4, 3),
)
SETTINGS = (
    ("automatic reselect_every", {}),
    ("reselect_every=1", {"reselect_every": 1}),
    ("importance_rows=2", {"importance_rows": 2}),
    ("reselect_every=1, importance_rows=2", {"reselect_every": 1, "importance_rows": 2}),
)


def main() -> None:
    torch.set_num_threads(2)
    out = ["# Green on small datasets", ""]
    out.append(
        f"Command: `.venv/bin/python bench/small_data.py` on {platform.machine()}, 2 threads, Python "
        f"{platform.python_version()}, torch {torch.__version__}. The demo Llama, chat data "
        "(tests.model_folders.dataset, seed 0), max_seq_len 96."
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = model_folder("llama", root / "llama")
        tokenizer = build_tokenizer()
        out += ["", "## rho_min by setting (the estimate's, exact)", ""]
        out += [
            "| examples | batch | epochs | setting | reselect_every at rho_min | rho_min |",
            "|---|---|---|---|---|---|",
        ]
        for examples, batch, epochs in CASES:
            path = write_jsonl(root / f"d{examples}.jsonl", dataset("messages", examples, seed=0))
            data = encode_dataset(validate_dataset(path), tokenizer, "causal_lm", 96, None)
            for label, extra in SETTINGS:
                hp = Hyperparameters(n_epochs=epochs, batch_size=batch, max_seq_len=96, **extra)
                costs = run_costs(folder, data, "green", hp, 0)
                every = costs.settings(hp, costs.rho_min)["reselect_every"]  # what it runs at rho_min
                out.append(f"| {examples} | {batch} | {epochs} | {label} | {every} | {costs.rho_min:.4f} |")

        path = root / "d24.jsonl"
        data = encode_dataset(validate_dataset(path), tokenizer, "causal_lm", 96, None)
        hp = Hyperparameters(n_epochs=1, batch_size=8, max_seq_len=96, rho=0.5)
        costs = run_costs(folder, data, "green", hp, 0)
        try:
            costs.resolve_rho(hp, EnergySettings())
            refusal = "(not refused)"
        except BudgetTooSmall as exc:
            refusal = str(exc)
        out += ["", "## The refusal of 24 examples at batch 8, one epoch, rho 0.5", "", f"> {refusal}"]

        spec = TrainSpec(
            model_dir=str(folder),
            train_file=str(path),
            output_dir=str(root / "out"),
            method="green",
            hyperparameters=Hyperparameters(
                n_epochs=3, batch_size=8, max_seq_len=96, learning_rate=1e-3, rho=0.5
            ),
        )
        report = train(spec)
        out += [
            "",
            "## greencore.train: 24 examples, batch 8, 3 epochs, rho 0.5 (automatic reselect_every)",
            "",
        ]
        out += [
            "| epoch | reselected | serves epochs | tensors | selection FLOPs | total FLOPs | full FLOPs "
            "| rho_achieved |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in report.epochs:
            f = e.flops
            out.append(
                f"| {e.epoch} | {e.selection['reselected']} | {e.selection['serves_epochs']} | "
                f"{len(e.selected_tensors)} | {f['selection']:.4g} | {f['total']:.4g} | {f['full']:.4g} | "
                f"{e.rho_achieved:.4f} |"
            )
        total = sum(e.flops["total"] for e in report.epochs)
        full = sum(e.flops["full"] for e in report.epochs)
        out += ["", f"Whole run: {total:.4g} of {full:.4g} FLOPs, rho {total / full:.4f} (budget 0.5)."]
    (ROOT / "bench" / "results" / "small-data.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
