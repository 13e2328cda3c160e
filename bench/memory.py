"""Benchmark of the peak-memory estimate (greencore.memory) against real CPU steps, and 8B-class shapes.

Run: .venv/bin/python bench/memory.py [--small]   (writes bench/results/memory.md; --big-only: part 2 alone)

Part 1 (CPU, real weights): a Llama-shaped model built from a config with random weights (about 350M
parameters; ``--small``: about 60M, for a quick run), batch 4 x 256 (with padding in two rows, as a run's
batches have), AdamW as greencore.train builds it, in the run's precision and micro-batches.
Each configuration runs in a fresh process: one warm-up optimizer step (the moments exist, as after step one),
then one training step as greencore.train runs it (frozen tensors narrowed under precision bf16, forwards
under the run's autocast, micro-batches accumulated) measured by a live-storage tracker (greencore.memory.
LiveStorages, on the real tensors) and by the process's peak RSS. Beside it the estimate on fake tensors from
the meta model. Configurations: full; green at rho 0.5 with a fixed selection (select_tensors on the model's
profile with every tensor of equal importance: the most tensors the budget allows; a real selection depends on
the data) in each precision, and with micro-batches of 1; green's bound (every tensor the budget can reach,
trained at once: what the service reports for green); LoRA (r 8, attention projections); and green's
importance evaluation of the bound's candidates (importance_pass itself as a run calls it, its copies in a
spill file; the training optimizer holding state for all of them), measured the same way, and green with
gradient checkpointing. Part 2 (meta device
only): Llama-3-8B, Qwen2.5-7B and Mistral-7B shapes at batch 1, 2, 4 x 2048, replayed for CUDA (the model's
SDPA attention, fused AdamW, importance's copies in host memory) in each precision: full, and
green-0.5's bound (training step and importance evaluation), against 80 GB.

``--ranks`` (writes bench/results/memory-ranks.md instead): one GPU's peak of a run on 1, 2, 4 and 8 ranks
of the same 8B-class shapes, under DDP and FSDP2 (``distributed``), at bf16-mixed, batch 8 x 2048 (each rank
its rows): full and green-0.5's bound, training step and importance evaluation, each replayed on fake tensors
with the run's engine over a fake process group (greencore.memory.fake_world), against 80 GB. The replay of a
rank matches a real gloo rank's measured peak in tests/test_memory_ranks.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from greencore.importance import importance_pass, tentative_optimizer_factory  # noqa: E402
from greencore.memory import LiveStorages, importance_bytes, train_step_bytes, warm_optimizer  # noqa: E402
from greencore.precision import HeldPrecision, autocast  # noqa: E402
from greencore.profile import profile_model, set_gradient_checkpointing  # noqa: E402
from greencore.select import reachable_tensors, select_tensors  # noqa: E402
from greencore.spec import Hyperparameters  # noqa: E402
from greencore.train import micro_batches  # noqa: E402

HP = Hyperparameters()
RHO = 0.5
BATCH, SEQ = 4, 256
GB = 1e9
DEVICE_GB = 80

MODEL_350M = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
)
MODEL_SMALL = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=32000,
)
# Public config numbers (hidden size, layers, heads, kv heads, intermediate size, vocab).
BIG = {
    "Llama-3-8B": (
        LlamaConfig,
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            vocab_size=128256,
        ),
    ),
    "Qwen2.5-7B": (
        Qwen2Config,
        dict(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            vocab_size=152064,
        ),
    ),
    "Mistral-7B": (
        MistralConfig,
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            vocab_size=32000,
        ),
    ),
}


def build(shape: dict, meta: bool) -> torch.nn.Module:
    config = LlamaConfig(**shape, max_position_embeddings=4096)
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def trained_sets(meta: torch.nn.Module) -> dict[str, list[str]]:
    profile = profile_model(meta, 1, SEQ)
    flat = dict.fromkeys(profile.names, 1.0)
    return {
        "full": [n for n, _ in meta.named_parameters()],
        "green-0.5 (selection)": list(select_tensors(profile, flat, RHO).names),
        "green-0.5 (bound)": list(reachable_tensors(profile, RHO)),
    }


def lora(model: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    from greencore.methods import make_method

    wrapped, _ = make_method("lora", HP).prepare(model, [])
    return wrapped, [n for n, p in wrapped.named_parameters() if p.requires_grad]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


# (label, trained set, precision, micro_batch_size, phase)
CONFIGS = [
    ("full", "full", "fp32", None, "step"),
    ("green-0.5 (selection)", "green-0.5 (selection)", "fp32", None, "step"),
    ("green-0.5 (selection), bf16-mixed", "green-0.5 (selection)", "bf16-mixed", None, "step"),
    ("green-0.5 (selection), bf16", "green-0.5 (selection)", "bf16", None, "step"),
    ("green-0.5 (selection), micro-batch 1", "green-0.5 (selection)", "fp32", 1, "step"),
    ("green-0.5 (selection), checkpointing", "green-0.5 (selection)", "fp32", None, "checkpointing"),
    ("green-0.5 (bound)", "green-0.5 (bound)", "fp32", None, "step"),
    ("green-0.5 (bound), importance", "green-0.5 (bound)", "fp32", None, "importance"),
    ("lora", "lora", "fp32", None, "step"),
]


def hyperparameters(precision: str, micro: int | None, phase: str = "step") -> Hyperparameters:
    return Hyperparameters(
        precision=precision, micro_batch_size=micro, gradient_checkpointing=phase == "checkpointing"
    )


def measure(shape: dict, config: int) -> dict:
    """One real training step (or importance evaluation) of ``CONFIGS[config]``, in this process."""
    _, which, precision, micro, phase = CONFIGS[config]
    hp = hyperparameters(precision, micro, phase)
    model = build(shape, meta=False)
    if hp.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    if which == "lora":
        model, trained = lora(model)
    else:
        trained = trained_sets(build(shape, meta=True))[which]
    keep = set(trained)
    held = HeldPrecision(model, hp.precision)
    held.narrow(keep=keep)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = warm_optimizer(params, hp)
    ids = torch.randint(3, shape["vocab_size"], (BATCH, SEQ))
    mask = torch.ones_like(ids)
    mask[0, -16:] = 0  # padding in the first and last rows (every micro-batch of 2 has some)
    mask[-1, -8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    tracker = LiveStorages()
    tracker.add(
        [
            *model.parameters(),
            *model.buffers(),
            *[v for s in opt.state.values() for v in s.values()],
            *batch.values(),
        ]
    )
    rss_before = rss_bytes()
    started = time.perf_counter()
    model.train()
    with tracker:
        if phase == "importance":
            importance_pass(model, [batch], tentative_optimizer_factory(opt), names=trained)
        else:
            for part, weight in micro_batches(batch, "causal_lm", micro):
                with autocast(hp.precision, "cpu"):
                    loss = model(**part).loss
                (loss if weight == 1.0 else loss * weight).backward()
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], HP.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {
        "tracker": tracker.peak_bytes,
        "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before": rss_before,
        "step_s": time.perf_counter() - started,
        "trained": len(trained),
    }


def estimate(shape: dict, config: int) -> int:
    _, which, precision, micro, phase = CONFIGS[config]
    hp = hyperparameters(precision, micro, phase)
    meta = build(shape, meta=True)
    if which == "lora":
        meta, trained = lora(meta)
    else:
        trained = trained_sets(meta)[which]
    if phase == "importance":
        return importance_bytes(meta, trained, trained, (BATCH, SEQ), "causal_lm", hp, "cpu")
    return train_step_bytes(meta, trained, (BATCH, SEQ), "causal_lm", hp, "cpu")


BIG_HEADER = f"## 8B-class shapes at 2048 tokens, replayed for CUDA (SDPA, fused AdamW), vs {DEVICE_GB} GB"
BIG_COLUMNS = [
    "| model | parameters | precision | batch | full step GB (fits) | green-0.5 reachable "
    "| green-0.5 step GB (fits) | green-0.5 importance GB (fits) |",
    "|---|---|---|---|---|---|---|---|",
]


def big_model(name: str) -> tuple[torch.nn.Module, list[str], list[str]]:
    """The meta model of BIG's ``name``, every tensor's name, and green-0.5's bound (what rho reaches)."""
    cls, numbers = BIG[name]
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cls(**numbers, max_position_embeddings=4096))
    every = [n for n, _ in meta.named_parameters()]
    return meta, every, list(reachable_tensors(profile_model(meta, 1, 2048), RHO))


def gb_fits(nbytes: int) -> str:
    return f"{nbytes / GB:.1f} ({'yes' if nbytes <= DEVICE_GB * GB else 'no'})"


def big_rows() -> list[str]:
    rows = []
    for name in BIG:
        started = time.perf_counter()
        meta, every, reach = big_model(name)
        params = sum(p.numel() for p in meta.parameters())
        for precision in ("fp32", "bf16-mixed", "bf16"):
            hp = hyperparameters(precision, None)
            for b in (1, 2, 4):
                full = train_step_bytes(meta, every, (b, 2048), "causal_lm", hp, "cuda")
                green = train_step_bytes(meta, reach, (b, 2048), "causal_lm", hp, "cuda")
                imp = importance_bytes(meta, reach, reach, (b, 2048), "causal_lm", hp, "cuda")
                rows.append(
                    f"| {name} | {params / 1e9:.2f}B | {precision} | {b} x 2048 | {gb_fits(full)} | "
                    f"{len(reach)}/{len(every)} | {gb_fits(green)} | {gb_fits(imp)} |"
                )
                print(rows[-1], flush=True)
        print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)
    return rows


RANK_BATCH = 8
WORLDS = (1, 2, 4, 8)


def rank_rows() -> list[str]:
    """One device's peak on each number of ranks (module docstring, ``--ranks``)."""
    rows = []
    for name in BIG:
        meta, every, reach = big_model(name)
        shape = (RANK_BATCH, 2048)
        for engine, micro in (("ddp", False), ("ddp", True), ("fsdp", False)):
            for world in WORLDS:
                if world == 1 and (engine == "fsdp" or micro):
                    continue  # one process: nothing to shard, and its micro-batch is the batch
                # micro: micro-batches of the rows each rank takes, which rank 0's importance passes (the
                # whole batch, under DDP) then run in too
                hp = hyperparameters("bf16-mixed", RANK_BATCH // world if micro else None)
                hp = replace(hp, distributed=engine)
                started = time.perf_counter()
                full = train_step_bytes(meta, every, shape, "causal_lm", hp, "cuda", world)
                green = train_step_bytes(meta, reach, shape, "causal_lm", hp, "cuda", world)
                imp = importance_bytes(meta, reach, reach, shape, "causal_lm", hp, "cuda", world)
                label = "one process" if world == 1 else engine + (", micro-batch = rows" if micro else "")
                rows.append(
                    f"| {name} | {label} | {world} | {RANK_BATCH // world} x 2048 | {gb_fits(full)} | "
                    f"{gb_fits(green)} | {gb_fits(imp)} | {time.perf_counter() - started:.0f} |"
                )
                print(rows[-1], flush=True)
    return rows


def write(name: str, lines: list[str]) -> None:
    out = ROOT / "bench" / "results" / name
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def write_ranks() -> None:
    rows = rank_rows()
    lines = [
        "# Peak memory of one GPU on several ranks: 8B-class shapes, estimate on fake tensors",
        "",
        f"Command: `.venv/bin/python bench/memory.py --ranks` (torch {torch.__version__}). Replayed for CUDA "
        "(the model's SDPA attention, fused AdamW), precision bf16-mixed, a global batch of "
        f"{RANK_BATCH} x 2048 tokens cut into each rank's rows (`rows per rank`), each rank's engine over a "
        "fake process group (greencore.memory.fake_world): DDP holds the whole model and the trained "
        "tensors' gradient buckets, FSDP2 a shard of every tensor, its gradient and AdamW state, one layer "
        "gathered at a time. Under DDP rank 0 runs the importance evaluation of the whole batch alone "
        "(`micro-batch = rows`: with `micro_batch_size` set to the rows each rank takes, in micro-batches of "
        "that size); sharded, every rank runs it on its rows. green-0.5: the bound the service reports "
        "(every tensor rho 0.5 can reach, trained at once). GB = 1e9 bytes; fits: within "
        f"{DEVICE_GB} GB. `s`: seconds to compute the row's three estimates.",
        "",
        "| model | engine | ranks | rows per rank | full step GB (fits) | green-0.5 step GB (fits) "
        "| green-0.5 importance GB (fits) | s |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    write("memory-ranks.md", lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", action="store_true", help="one GPU's peak on several ranks only")
    parser.add_argument(
        "--big-only",
        action="store_true",
        help="recompute only part 2 (8B-class shapes, meta device) into the existing memory.md",
    )
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args()
    if args.ranks:
        write_ranks()
        return
    if args.big_only:
        path = ROOT / "bench" / "results" / "memory.md"
        head, sep, _table = path.read_text().partition(BIG_HEADER)
        again = "Command: `.venv/bin/python bench/memory.py --big-only` (this part alone; part 1 is older)."
        write("memory.md", [head + sep, "", again, "", *BIG_COLUMNS, *big_rows()])
        return
    shape = MODEL_SMALL if args.small else MODEL_350M
    if args.measure is not None:
        print(json.dumps(measure(shape, int(args.measure))))
        return
    n_params = sum(p.numel() for p in build(shape, meta=True).parameters())
    torch_threads = torch.get_num_threads()
    rows = []
    for i, (label, *_rest) in enumerate(CONFIGS):
        started = time.perf_counter()
        est = estimate(shape, i)
        est_s = time.perf_counter() - started
        cmd = [sys.executable, __file__, "--measure", str(i)] + (["--small"] if args.small else [])
        real = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
        err = est / real["tracker"] - 1
        rows.append(
            f"| {label} | {real['trained']} | {est / GB:.3f} | {real['tracker'] / GB:.3f} | "
            f"{100 * err:+.2f}% | "
            f"{real['rss_peak'] / GB:.3f} ({(real['rss_peak'] - real['rss_before']) / GB:+.3f}) | "
            f"{real['step_s']:.1f} | {est_s:.1f} |"
        )
        print(rows[-1], flush=True)
    big = [] if args.skip_big else big_rows()
    lines = [
        "# Peak memory: estimate on fake tensors vs measured",
        "",
        f"Command: `.venv/bin/python bench/memory.py{' --small' if args.small else ''}` on "
        f"{platform.machine()}, "
        f"{platform.processor() or 'cpu'}, torch {torch.__version__}, {torch_threads} threads.",
        "",
        f"## Real CPU steps: Llama-shaped, {n_params / 1e6:.0f}M parameters (random weights), "
        f"batch {BATCH} x {SEQ}, "
        "precision per row",
        "",
        "GB = 1e9 bytes. Estimate: greencore.memory on the meta model. Measured: live-storage tracker on the "
        "real step (weights, optimizer state and batch counted from the start); RSS: the process's peak (and "
        "its growth "
        "during the step, which excludes what was resident before: weights, moments, libraries).",
        "",
        "| config | tensors trained | estimate GB | measured GB | error | RSS peak GB (step) "
        "| step s | estimate s |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if big:
        lines += [
            "",
            BIG_HEADER,
            "",
            *BIG_COLUMNS,
            *big,
        ]
    write("memory.md", lines)


if __name__ == "__main__":
    main()
