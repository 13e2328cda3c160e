"""One training step of full and green-0.5 on a ~1B Llama, per precision: time, peak memory, FLOPs, energy.

Run on one CUDA GPU (bench/gpu_methods.sh runs it):   python bench/gpu_step.py [--out FILE]
End to end on the CPU, on a tiny model (a dry run):   .venv/bin/python bench/gpu_step.py --device cpu --small

The model is Llama-shaped, built from a ``LlamaConfig`` with random weights (TinyLlama-1.1B's shape: width
2048, 22 layers, 16 heads / 8 key-value heads, MLP 5632, vocabulary 32000: 1.17B parameters), on batches of
4 x 1024 tokens with no padding (token ids drawn at random; a full fp32 step holds about 32 GB by the
estimate, well inside 80 GB), attention the model's default (SDPA). Each configuration (full and green at
rho 0.5, in precision fp32, bf16-mixed and bf16) runs a step as greencore.train runs it: frozen tensors
narrowed by HeldPrecision under bf16, the forward under the precision's autocast, backward, gradient
clipping, AdamW (the learning-rate schedule left out: it costs nothing on the device); on CUDA fp32 matmuls
on TF32 tensor cores, as greencore.train sets. Per configuration:

- FLOPs: the first step's forward and backward under FlopCounterMode (as greencore.train measures an
  epoch's first step) against the profile's prediction, ``profile.step_flops(trained).total``
  (greencore.profile.profile_model as the service takes it: the float32 model with its own attention, SDPA,
  traced on CPU fake tensors and counted by the fused kernels' formula); the difference exactly, and the
  attention kernel FlopCounterMode saw (``bmm`` where SDPA fell back to its math path).
- warm-up steps, then peak memory of one step: on CUDA the allocator's ``max_memory_allocated`` (reset
  before the step; everything the process holds on the device counts: weights, AdamW state, batch), on the
  CPU greencore.memory.LiveStorages on the real tensors; beside it greencore.memory.train_step_bytes on the
  meta model for the same device type, and the error.
- the timed steps (at least ``--steps``, more until they last ``--timed-s``): the median step time (each step
  synchronized), and their energy by greencore.energy.EnergyMeter, labelled with its method (``nvml`` on a
  GPU with an energy counter, ``rapl`` or else ``estimate``, the declared device profile's).

Green's selection is greencore's own, made once in fp32 and trained in every precision (so the precisions
compare one set of tensors): the importance pass (greencore.importance.importance_pass, the tensors a
selection could reach as candidates, a fresh AdamW's tentative step) on the run's batch, then
``select_tensors(profile, scores, 0.5)`` on the step's profile. A training epoch also reserves its
importance FLOPs inside rho; here the step alone is budgeted, as over an epoch of many steps.
``--selection equal`` selects with every tensor of equal importance instead (the most tensors the budget
allows, as bench/memory.py does). Writes a markdown table (after each configuration, so a run cut short
keeps what it measured) and prints it with the elapsed time.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from greencore.energy import EnergyMeter, EnergyReading  # noqa: E402
from greencore.importance import importance_pass, tentative_optimizer_factory  # noqa: E402
from greencore.memory import LiveStorages, train_step_bytes  # noqa: E402
from greencore.precision import HeldPrecision, autocast, resolve_precision  # noqa: E402
from greencore.profile import TensorProfile, attention_of, profile_model  # noqa: E402
from greencore.select import reachable_tensors, select_tensors  # noqa: E402
from greencore.spec import EnergySettings, Hyperparameters  # noqa: E402
from greencore.train import micro_batches  # noqa: E402

Batch = dict[str, torch.Tensor]

RHO = 0.5  # green's budget: a share of full fine-tuning's step FLOPs
TARGET_RATIO = 0.55  # issue 14: green-0.5's step time at most 0.55 of full's
GB = 1e9
STEP_LR = 1e-5  # AdamW's rate in the timed steps (what it is changes no step's time)
PRECISIONS = ("fp32", "bf16-mixed", "bf16")
METHODS = ("full", "green-0.5")
TASK = "causal_lm"

# TinyLlama-1.1B's shape (public config numbers); 1.17B parameters.
MODEL_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=16,
    num_key_value_heads=8,
    vocab_size=32000,
)
BATCH_1B = (4, 1024)  # rows x tokens
# Under a second per step on two CPU cores: the whole dry run in seconds.
MODEL_SMALL = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)
BATCH_SMALL = (2, 32)


@dataclass
class Row:
    """What one configuration measured; sizes in bytes, FLOPs as FlopCounterMode counts them."""

    precision: str
    method: str
    trained: int  # tensors trained
    predicted_flops: int  # one step's forward and backward, by the profile
    measured_flops: int  # the same, FlopCounterMode on the first step
    attention_ops: str  # the attention kernels FlopCounterMode counted (bmm: SDPA's math fallback)
    step_s: float  # median of the timed steps
    steps: int  # timed steps
    peak_bytes: int
    estimate_bytes: int
    energy: EnergyReading


def build(shape: dict[str, int], device: str) -> nn.Module:
    """The Llama-shaped causal LM with random weights (seed 0), in float32, on ``device`` ("meta" too)."""
    config = LlamaConfig(**shape, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_batch(shape: tuple[int, int], vocab: int, device: torch.device) -> Batch:
    """A batch as greencore.data.collate builds it for causal LM, every row full length (no padding)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, shape, generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def forward_backward(model: nn.Module, batch: Batch, hp: Hyperparameters, device: torch.device) -> None:
    """Gradients of the batch's loss into ``.grad``, as greencore.train's ``_forward_backward``."""
    precision = resolve_precision(hp, device.type)
    for part, weight in micro_batches(batch, TASK, hp.micro_batch_size):
        with autocast(precision, device.type):
            loss = model(**part).loss
        (loss if weight == 1.0 else loss * weight).backward()


def optimizer_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, hp: Hyperparameters) -> None:
    """Clip, step, clear, as greencore.train's ``_optimizer_step`` (without the schedule)."""
    if hp.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], hp.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def select_green(
    shape: dict[str, int], batch: Batch, profile: TensorProfile, device: torch.device, how: str
) -> tuple[tuple[str, ...], str]:
    """Green's tensors at ``RHO`` and a line saying how they were chosen."""
    if how == "equal":
        sel = select_tensors(profile, dict.fromkeys(profile.names, 1.0), RHO)
        return sel.names, f"every tensor of equal importance; step rho {sel.rho_achieved:.4f}"
    model = build(shape, str(device))
    candidates = reachable_tensors(profile, RHO)
    optimizer = torch.optim.AdamW(model.parameters(), lr=STEP_LR)
    started = time.perf_counter()
    measured = importance_pass(model, [batch], tentative_optimizer_factory(optimizer), names=candidates)
    synchronize(device)
    took = time.perf_counter() - started
    sel = select_tensors(profile, measured.scores, RHO)
    del model, optimizer, measured
    free(device)
    return sel.names, (
        f"greencore's importance pass (fp32, {len(candidates)} candidates, {took:.1f} s), then "
        f"select_tensors; step rho {sel.rho_achieved:.4f}"
    )


def peak_of_step(
    step: Callable[[], None],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    device: torch.device,
) -> int:
    """Peak bytes of one ``step``: the CUDA allocator's, or on the CPU the live storages' (held tensors
    counted from the start)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    tracker = LiveStorages()
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    tracker.add([*model.parameters(), *model.buffers(), *state, *batch.values()])
    with tracker:
        step()
    return tracker.peak_bytes


def measure(
    shape: dict[str, int],
    batch: Batch,
    trained: tuple[str, ...],
    hp: Hyperparameters,
    device: torch.device,
    args: argparse.Namespace,
    meter: EnergyMeter,
    predicted_flops: int,
) -> tuple[int, str, float, int, int, EnergyReading]:
    """(measured FLOPs, attention ops counted, median step s, timed steps, peak bytes, energy) of training
    ``trained``;
    ``predicted_flops`` (one step's) is what an energy estimate is computed from. The model and optimizer
    are freed on return (call :func:`free` then)."""
    model = build(shape, str(device))
    held = HeldPrecision(model, resolve_precision(hp, device.type))
    held.narrow(keep=trained)  # frozen tensors in bf16 under precision bf16
    keep = set(trained)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=STEP_LR, weight_decay=hp.weight_decay)
    model.train()

    def step() -> None:
        forward_backward(model, batch, hp, device)
        optimizer_step(params, optimizer, hp)

    with FlopCounterMode(display=False) as counter:  # the first step's forward and backward
        forward_backward(model, batch, hp, device)
    optimizer_step(params, optimizer, hp)
    measured_flops = int(counter.get_total_flops())
    # The attention kernel the step ran (the fused ones count by formula; bmm: the math fallback).
    counted = [str(op).removeprefix("aten.") for op in counter.get_flop_counts().get("Global", {})]
    kernels = [op.removeprefix("_scaled_dot_product_") for op in counted if "attention" in op or op == "bmm"]
    attention_ops = ", ".join(dict.fromkeys(op.removesuffix("_backward") for op in kernels)) or "none"
    warm = []
    for _ in range(args.warmup):
        started = time.perf_counter()
        step()
        synchronize(device)
        warm.append(time.perf_counter() - started)
    peak = peak_of_step(step, model, optimizer, batch, device)
    n = args.steps
    if warm and args.timed_s > 0:  # enough steps for the energy counter to resolve
        n = max(n, math.ceil(args.timed_s / statistics.median(warm)))
    times = []
    synchronize(device)
    meter.start()
    for _ in range(n):
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    energy = meter.stop(predicted_flops * n)
    return measured_flops, attention_ops, statistics.median(times), n, peak, energy


def energy_cell(energy: EnergyReading, steps: int) -> str:
    return f"{energy.energy_j:.1f} | {energy.energy_j / steps:.2f} | {energy.method}"


def table(rows: list[Row], skipped: list[tuple[str, str]]) -> list[str]:
    full = {r.precision: r.step_s for r in rows if r.method == "full"}
    lines = [
        "| precision | method | tensors trained | step FLOPs predicted | measured | measured - predicted "
        "| attention ops counted | step ms (median) | timed steps | green/full time | peak GB | estimate GB "
        "| error | energy J (timed steps) | J per step | energy method |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r.step_s / full[r.precision]:.3f}" if r.method != "full" and r.precision in full else ""
        error = 100 * (r.estimate_bytes / r.peak_bytes - 1)
        lines.append(
            f"| {r.precision} | {r.method} | {r.trained} | {r.predicted_flops:,} | {r.measured_flops:,} "
            f"| {r.measured_flops - r.predicted_flops:+,} | {r.attention_ops} | {1e3 * r.step_s:.2f} "
            f"| {r.steps} | {ratio} "
            f"| {r.peak_bytes / GB:.3f} | {r.estimate_bytes / GB:.3f} | {error:+.2f}% "
            f"| {energy_cell(r.energy, r.steps)} |"
        )
    lines += [f"| {config.replace('/', ' | ')} | skipped: {why} |" + " |" * 13 for config, why in skipped]
    return lines


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = " ".join(filter(None, (platform.machine(), platform.processor())))
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def write(
    out: Path, header: list[str], rows: list[Row], skipped: list[tuple[str, str]], footer: list[str]
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*header, *table(rows, skipped), "", *footer]) + "\n")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a dry run)")
    parser.add_argument("--small", action="store_true", help="a tiny model and batch (for a dry run)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration, at least")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the FLOPs-counted one")
    parser.add_argument(
        "--timed-s",
        type=float,
        default=None,
        help="time the steps for at least this long (default 5 on CUDA)",
    )
    parser.add_argument("--selection", choices=("importance", "equal"), default="importance")
    parser.add_argument("--max-s", type=float, default=480.0, help="skip configurations begun after this")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown file (default bench/results/gpu.md; on a CPU, in the temporary folder)",
    )
    args = parser.parse_args()
    if args.timed_s is None:
        args.timed_s = 5.0 if args.device.startswith("cuda") else 0.0
    if args.out is None:  # a dry run's numbers are no measurement: kept out of bench/results
        cuda = args.device.startswith("cuda")
        args.out = (
            ROOT / "bench" / "results" / "gpu.md" if cuda else Path(tempfile.gettempdir()) / "gpu-cpu.md"
        )
    return args


def main() -> None:
    started = time.perf_counter()
    args = parse()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --device cpu --small for a dry run")
        torch.backends.cuda.matmul.allow_tf32 = True  # as greencore.train: fp32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    shape, batch_shape = (MODEL_SMALL, BATCH_SMALL) if args.small else (MODEL_1B, BATCH_1B)
    batch = make_batch(batch_shape, shape["vocab_size"], device)
    meta = build(shape, "meta")
    every = tuple(n for n, _ in meta.named_parameters())
    n_params = sum(p.numel() for p in meta.parameters())

    # The profile as the service takes it: the model in float32, no autocast, traced on CPU fake tensors
    # (SDPA counted as the fused kernels' formula, greencore.flops).
    attention = attention_of(meta)[0]
    profile = profile_model(meta, *batch_shape)
    green, how = select_green(shape, batch, profile, device, args.selection)
    trained_sets = {"full": every, "green-0.5": green}
    print(f"green-0.5: {len(green)} of {len(every)} tensors ({how})", flush=True)

    meter = EnergyMeter(str(device), EnergySettings())
    header = [
        "# One training step on a ~1B Llama: full and green-0.5 per precision",
        "",
        f"Command: `python bench/gpu_step.py {' '.join(sys.argv[1:])}`. Device: {device_name(device)}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}.",
        "",
        f"Model: Llama-shaped from a config with random weights, {n_params / 1e6:,.1f}M parameters "
        f"(width {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} key-value heads, "
        f"MLP {shape['intermediate_size']}, vocabulary {shape['vocab_size']}); batch {batch_shape[0]} x "
        f"{batch_shape[1]} tokens, no padding; attention {attention}. Green-0.5 trains {len(green)} of "
        f"{len(every)} tensors: {how}.",
        "",
        "FLOPs: one step's forward and backward, FlopCounterMode's count (a multiply-add is 2); predicted by "
        "the profile (greencore.profile). Peak: "
        + (
            "the CUDA allocator's max_memory_allocated over one step after warm-up (everything the process "
            "holds on the device)"
            if device.type == "cuda"
            else "greencore.memory.LiveStorages over one step after warm-up (real tensors)"
        )
        + f"; estimate: greencore.memory.train_step_bytes on the meta model for {device.type}. GB = 1e9 "
        f"bytes. Step time: median of the timed steps, each synchronized. Target: green/full time <= "
        f"{TARGET_RATIO}.",
        "",
    ]
    rows: list[Row] = []
    skipped: list[tuple[str, str]] = []
    footer: list[str] = []
    for precision in PRECISIONS:
        hp = Hyperparameters(precision=precision, batch_size=batch_shape[0], max_seq_len=batch_shape[1])
        for method in METHODS:
            elapsed = time.perf_counter() - started
            if elapsed > args.max_s:
                skipped.append((f"{precision}/{method}", f"begun after {elapsed:.0f} s (--max-s)"))
                continue
            trained = trained_sets[method]
            if device.type == "cuda":  # counts in the peak: should be next to nothing
                print(f"allocated before {precision} {method}: {torch.cuda.memory_allocated(device)} B")
            estimate = train_step_bytes(meta, trained, batch_shape, TASK, hp, device.type)
            predicted = profile.step_flops(trained).total
            flops, attention_ops, step_s, n, peak, energy = measure(
                shape, batch, trained, hp, device, args, meter, predicted
            )
            rows.append(
                Row(
                    precision,
                    method,
                    len(trained),
                    predicted,
                    flops,
                    attention_ops,
                    step_s,
                    n,
                    peak,
                    estimate,
                    energy,
                )
            )
            print(f"{table(rows, [])[-1]}  ({time.perf_counter() - started:.0f} s)", flush=True)
            write(args.out, header, rows, skipped, footer)
    full = {r.precision: r.step_s for r in rows if r.method == "full"}
    for r in rows:
        if r.method != "full" and r.precision in full:
            ratio = r.step_s / full[r.precision]
            verdict = "meets" if ratio <= TARGET_RATIO else "misses"
            footer.append(
                f"- {r.precision}: green-0.5 / full step time {ratio:.3f} ({verdict} <= {TARGET_RATIO})"
            )
    estimated = {r.energy.method for r in rows} - {"nvml", "rapl"}
    if estimated:
        footer.append(
            "- energy method `estimate`: no hardware counter was readable; the declared device profile's "
            "FLOPs-based figure (greencore.energy.estimate_j), not a measurement"
        )
    footer.append(
        f"- elapsed {time.perf_counter() - started:.1f} s (all of the above, model builds included)"
    )
    write(args.out, header, rows, skipped, footer)
    print("\n".join([*header, *table(rows, skipped), "", *footer]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
