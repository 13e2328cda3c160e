"""Exactness of the FLOPs profile on architectures beyond the test suite's ten.

Run: .venv/bin/python bench/architectures.py   (writes bench/results/architectures.md)

For each tiny config: the worst relative error of profile.step_flops(mask).total against FlopCounterMode's
count of a real forward+backward (full mask, every single-tensor mask, 4 random masks; batch 2 x 24 tokens).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from greencore.profile import ProfileError, measure_step_flops, profile_model  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DEC = dict(
    num_hidden_layers=2,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    max_position_embeddings=128,
)
CLS, LM, S2S = AutoModelForSequenceClassification, AutoModelForCausalLM, AutoModelForSeq2SeqLM
CASES = {
    "gemma": ("gemma", LM, dict(DEC, num_key_value_heads=2, head_dim=8)),
    "gemma2": ("gemma2", LM, dict(DEC, num_key_value_heads=2, head_dim=8)),
    "falcon": ("falcon", LM, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4)),
    "gptj": ("gptj", LM, dict(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_positions=128)),
    "stablelm": ("stablelm", LM, dict(DEC, num_key_value_heads=4)),
    "starcoder2": ("starcoder2", LM, dict(DEC, num_key_value_heads=2)),
    "olmo": ("olmo", LM, dict(DEC)),
    "phi3": ("phi3", LM, dict(DEC)),
    "gpt_bigcode (MQA)": ("gpt_bigcode", LM, dict(n_layer=2, n_embd=32, n_head=4, n_positions=128)),
    "roberta": ("roberta", CLS, dict(DEC, num_labels=3, max_position_embeddings=130)),
    "distilbert": ("distilbert", CLS, dict(n_layers=2, dim=32, hidden_dim=48, n_heads=4, num_labels=2)),
    "albert (shared layers)": ("albert", CLS, dict(DEC, embedding_size=16, num_labels=2)),
    "deberta-v2": ("deberta-v2", CLS, dict(DEC, num_labels=2)),
    "electra": ("electra", CLS, dict(DEC, embedding_size=16, num_labels=2)),
    "bart": (
        "bart",
        S2S,
        dict(
            encoder_layers=2,
            decoder_layers=2,
            d_model=32,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=128,
        ),
    ),
    "gpt2 classifier": ("gpt2", CLS, dict(n_layer=2, n_embd=32, n_head=4, n_positions=128, num_labels=2)),
    "llama classifier": ("llama", CLS, dict(DEC, num_labels=2)),
    "mamba (convolutions)": ("mamba", LM, dict(num_hidden_layers=2, hidden_size=32, state_size=4)),
    "mixtral (MoE)": (
        "mixtral",
        LM,
        dict(DEC, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    ),
}


def check(model_type: str, auto: type, kwargs: dict) -> str:
    config = AutoConfig.for_model(model_type, **{**COMMON, **kwargs})
    torch.manual_seed(0)
    model = auto.from_config(config)
    try:
        profile = profile_model(model, 2, 24)
    except ProfileError as exc:
        return f"| - | - | not supported: {str(exc)[:90]} |"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 24), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if config.is_encoder_decoder:
        batch["labels"] = torch.randint(3, VOCAB, (2, 24), generator=g)
    elif auto is CLS:
        batch["labels"] = torch.tensor([0, 1])
    else:
        batch["labels"] = ids
    rng = random.Random(0)
    masks = [set(profile.names)] + [{n} for n in profile.names]
    masks += [set(rng.sample(profile.names, rng.randint(1, len(profile.names)))) for _ in range(4)]
    worst = 0.0
    for mask in masks:
        measured = measure_step_flops(model, batch, mask)
        worst = max(worst, abs(profile.step_flops(mask).total - measured) / measured)
    return f"| {len(profile.names)} | {len(masks)} | {worst:.1e} |"


def main() -> None:
    rows = []
    for label, (model_type, auto, kwargs) in CASES.items():
        rows.append(f"| {label} {check(model_type, auto, kwargs)}")
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            "# FLOPs profile on architectures beyond the test suite",
            "",
            "Command: `.venv/bin/python bench/architectures.py`. Worst relative error of "
            "`step_flops(mask).total`",
            "against FlopCounterMode on a real step (batch 2 x 24, eager attention).",
            "",
            "| architecture | tensors | masks | worst_rel_error |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    out = ROOT / "bench" / "results" / "architectures.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
