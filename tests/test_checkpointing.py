"""Gradient checkpointing in the profile: a checkpointed layer's forward runs again when backward reaches it,
and the profile counts it exactly (FlopCounterMode on real steps), for every selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from greencore.memory import train_step_bytes
from greencore.profile import (
    ProfileError,
    checkpointing_of,
    gradient_checkpointing,
    measure_step_flops,
    profile_model,
    set_gradient_checkpointing,
)
from greencore.spec import Hyperparameters
from tests.tiny_models import batch_for, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _masks(names: list[str]) -> dict[str, list[str]]:
    mid = len(names) // 2
    norms = [n for n in names if "norm" in n or ".ln" in n or "LayerNorm" in n]
    return {
        "all": names,
        "head": names[-1:],
        "deep": names[1:2],
        "middle": names[mid : mid + 1],
        "a norm": norms[-2:-1],
    }


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2", "t5", "bert"])
def test_recompute_is_counted_exactly_for_every_selection(family: str) -> None:
    model = tiny_model(family)
    names = [n for n, _ in model.named_parameters()]
    batch = batch_for(model, 2, 16)
    target = batch["labels"].shape[1] if model.config.is_encoder_decoder else None
    plain = profile_model(model, 2, 16, target)
    with gradient_checkpointing(model, True):
        assert checkpointing_of(model)
        profile = profile_model(model, 2, 16, target)
    assert not checkpointing_of(model)
    recomputed = 0
    for label, mask in _masks(names).items():
        mask = [n for n in mask if n in profile.names]
        if not mask:
            continue
        with gradient_checkpointing(model, True):
            measured = measure_step_flops(model, batch, mask)
        assert measured == profile.step_flops(mask).total, (label, measured, profile.step_flops(mask))
        extra = profile.step_flops(mask).total - plain.step_flops(mask).total
        assert extra >= 0
        recomputed += extra
    assert recomputed > 0  # some selection reaches a checkpointed layer


def test_checkpointing_keeps_less_and_the_estimate_matches_a_real_step() -> None:
    from greencore.memory import LiveStorages

    model = tiny_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    names = [n for n, _ in model.named_parameters()]
    trained = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    batch = batch_for(model, 4, 64)
    batch["attention_mask"][0, -3:] = 0
    tracker = LiveStorages()
    tracker.add([*params, *model.buffers(), *[v for s in opt.state.values() for v in s.values()]])
    tracker.add(batch.values())
    set_gradient_checkpointing(model, True)
    model.train()
    with tracker:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    meta = tiny_model("llama", device="meta", hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    hp = Hyperparameters(gradient_checkpointing=True, attention="sdpa")
    estimate = train_step_bytes(meta, trained, (4, 64), "causal_lm", hp)
    assert abs(estimate - tracker.peak_bytes) <= max(0.01 * tracker.peak_bytes, 32 << 10)
    deep = names[1:2]  # a tensor low in the model: every layer's activations are kept without checkpointing
    without = train_step_bytes(meta, deep, (4, 64), "causal_lm", Hyperparameters(attention="sdpa"))
    assert train_step_bytes(meta, deep, (4, 64), "causal_lm", hp) < without


def test_a_model_without_checkpointable_layers_is_refused() -> None:
    with pytest.raises(ProfileError, match="gradient checkpointing"):
        set_gradient_checkpointing(nn.Sequential(nn.Linear(4, 4)), True)
