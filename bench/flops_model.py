"""Benchmark of the FLOPs profile: exactness per architecture, and speed on 7B-shaped models.

Run: .venv/bin/python bench/flops_model.py   (writes bench/results/flops_model.md)

Part 1: for tiny configs of every supported architecture, at two sequence lengths, the worst relative error of
profile.step_flops(mask).total against FlopCounterMode's count of a real forward+backward with exactly that
mask (full mask, every single-tensor mask, 6 random masks).
Part 2: 7B-shaped Llama and OPT built on the meta device: profile time at batch 4 x 512, tensors, rho_min, and
the time of one step_flops call (selection calls it often).
"""

from __future__ import annotations

import platform
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from greencore.profile import measure_step_flops, profile_model  # noqa: E402
from tests.tiny_models import TINY, batch_for, tiny_model  # noqa: E402

SEQ_LENS = (8, 64)
BATCH = 2

BIG = {
    "llama-7b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        ),
    ),
    "opt-6.7b": (
        "opt",
        dict(
            hidden_size=4096,
            ffn_dim=16384,
            num_hidden_layers=32,
            num_attention_heads=32,
            vocab_size=50272,
            word_embed_proj_dim=4096,
            max_position_embeddings=2048,
        ),
    ),
}


def exactness_rows() -> list[str]:
    rows = []
    for arch in sorted(TINY):
        model = tiny_model(arch)
        for seq_len in SEQ_LENS:
            start = time.perf_counter()
            profile = profile_model(model, BATCH, seq_len)
            profile_s = time.perf_counter() - start
            batch = batch_for(model, BATCH, seq_len)
            rng = random.Random(seq_len)
            masks = [set(profile.names)] + [{n} for n in profile.names]
            masks += [set(rng.sample(profile.names, rng.randint(2, len(profile.names)))) for _ in range(6)]
            worst = max(
                abs(profile.step_flops(m).total - measure_step_flops(model, batch, m))
                / measure_step_flops(model, batch, m)
                for m in masks
            )
            rows.append(
                f"| {arch} | {seq_len} | {len(profile.names)} | {len(masks)} | {profile_s:.3f} | {worst:.1e} "
                f"| {profile.full.bwd_act / profile.full.total:.3f} | {profile.rho_min:.3f} |"
            )
            print(rows[-1], flush=True)
    return rows


def speed_rows() -> list[str]:
    rows = []
    for label, (model_type, kwargs) in BIG.items():
        config = AutoConfig.for_model(model_type, **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        start = time.perf_counter()
        profile = profile_model(model, 4, 512)
        profile_s = time.perf_counter() - start
        rng = random.Random(0)
        masks = [[rng.random() < 0.3 for _ in profile.names] for _ in range(200)]
        start = time.perf_counter()
        for mask in masks:
            profile.step_flops(mask)
        step_ms = (time.perf_counter() - start) / len(masks) * 1e3
        rows.append(
            f"| {label} | {len(profile.names)} | {profile_s:.2f} | {step_ms:.3f} | {profile.full.total:.3e} "
            f"| {profile.rho_min:.3f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    exact = exactness_rows()
    speed = speed_rows()
    lines = [
        "# FLOPs profile: exactness and speed",
        "",
        f"Command: `.venv/bin/python bench/flops_model.py` on {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        "## Exactness against FlopCounterMode (tiny configs, batch 2, eager attention)",
        "",
        "Worst relative error of `profile.step_flops(mask).total` against FlopCounterMode's count of a real",
        "forward+backward with exactly that mask trainable, over the full mask, every single-tensor mask and",
        "6 random masks.",
        "",
        "| architecture | seq_len | tensors | masks | profile_s | worst_rel_error | bwd_act_share | "
        "rho_min |",
        "|---|---|---|---|---|---|---|---|",
        *exact,
        "",
        "## 7B-shaped models on the meta device (batch 4 x 512)",
        "",
        "| model | tensors | profile_s | step_flops_ms | full_step_flops | rho_min |",
        "|---|---|---|---|---|---|",
        *speed,
        "",
        "Targets: profile under 30 s; step_flops of one mask of a ~500-tensor model under 1 ms.",
    ]
    out = ROOT / "bench" / "results" / "flops_model.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
