"""The FLOPs profile against FlopCounterMode's count of real training steps, on every architecture we
support."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from greencore import StepFlops, TensorProfile, profile_model
from greencore.profile import attention_of, input_embedding_modules, measure_step_flops
from tests.tiny_models import TINY, batch_for, tiny_config, tiny_model

SEQ_LENS = (8, 48)  # attention's share grows with length: a wrong attention model hides at short ones
BATCH = 2
ATTENTIONS = ("eager", "sdpa")  # what a run can train with (Hyperparameters.attention); bloom has eager only


SAMPLED_SINGLES = 10  # at the longer length, this many single tensors (the first and last among them)


def masks_to_check(names: tuple[str, ...], seed: int, every_single: bool = True) -> list[set[str]]:
    """The full mask, single tensors (every one, or a sample with the shallowest and the deepest) and six
    random subsets. Every single tensor is checked once per architecture and attention, at the shorter
    length; each is a step of its own, and the deep encoder-decoders have a hundred."""
    rng = random.Random(seed)
    singles = list(names)
    if not every_single and len(names) > SAMPLED_SINGLES:
        singles = [names[0], names[-1], *rng.sample(names[1:-1], SAMPLED_SINGLES - 2)]
    masks = [set(names)] + [{n} for n in singles]
    masks += [set(rng.sample(names, rng.randint(2, len(names)))) for _ in range(6)]
    return masks


@pytest.fixture(scope="module", params=sorted(TINY))
def arch(request):
    return request.param


@pytest.fixture(params=ATTENTIONS)
def attention(request, arch: str) -> str:
    if request.param == "sdpa" and not TINY[arch][1].from_config(tiny_config(arch))._supports_sdpa:
        pytest.skip(f"{arch} has no SDPA implementation")
    return request.param


@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_step_flops_equal_flop_counter_for_every_mask(arch: str, attention: str, seq_len: int) -> None:
    model = tiny_model(arch, attn_implementation=attention)
    assert attention_of(model)[0] == attention
    profile = profile_model(model, BATCH, seq_len)
    batch = batch_for(model, BATCH, seq_len)
    assert profile.exact
    worst = 0.0
    for mask in masks_to_check(profile.names, seed=seq_len, every_single=seq_len == SEQ_LENS[0]):
        measured = measure_step_flops(model, batch, mask)
        predicted = profile.step_flops(mask).total
        worst = max(worst, abs(predicted - measured) / measured)
    assert worst <= 1e-3, f"{arch} ({attention}) at {seq_len} tokens: worst relative error {worst:.2e}"
    # Exact agreement is what reading autograd's graph gives; keep it exact for the full step.
    assert profile.full.total == measure_step_flops(model, batch, set(profile.names))


def test_forward_and_split_match_measurement(arch: str, attention: str) -> None:
    model = tiny_model(arch, attn_implementation=attention)
    seq_len = SEQ_LENS[-1]
    profile = profile_model(model, BATCH, seq_len)
    batch = batch_for(model, BATCH, seq_len)
    full = profile.full
    assert full.fwd + full.bwd_act + full.bwd_weight == full.total

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch)
    assert full.fwd == counter.get_total_flops()

    # The activation-gradient share of a full step: a backward in which no weight trains but the input
    # embeddings need a gradient.
    for param in model.parameters():
        param.requires_grad_(False)
    hooks = [
        module.register_forward_hook(lambda m, a, out: out.requires_grad_())
        for module in input_embedding_modules(model)
    ]
    try:
        with FlopCounterMode(display=False) as counter:
            model(**batch).loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        for param in model.parameters():
            param.requires_grad_(True)
    assert full.bwd_act == counter.get_total_flops() - full.fwd


def test_rho_min_is_the_cheapest_single_tensor() -> None:
    profile = profile_model(tiny_model("llama"), BATCH, 16)
    cheapest = min(profile.step_flops({n}).total for n in profile.names)
    assert profile.rho_min == pytest.approx(cheapest / profile.full.total)
    assert 0.3 < profile.rho_min < 1


def test_weight_gradient_of_a_linear_is_its_matmul() -> None:
    profile = profile_model(tiny_model("llama", device="meta"), BATCH, 16)
    hidden, kv = 32, 16  # 4 query heads and 2 key/value heads of 8
    # dW = dY^T X: 2 FLOPs per multiply-add over (tokens x in x out); q's own reach also pays dX of q alone.
    assert (
        profile.tensor_flops("model.layers.1.self_attn.q_proj.weight").bwd_weight
        == 2 * BATCH * 16 * hidden * hidden
    )
    assert (
        profile.tensor_flops("model.layers.1.self_attn.k_proj.weight").bwd_weight
        == 2 * BATCH * 16 * hidden * kv
    )
    # Norm weights cost no matmul of their own, only the activation gradients needed to reach them.
    norm = profile.tensor_flops("model.layers.1.input_layernorm.weight")
    assert norm.bwd_weight == 0 and norm.bwd_act > 0


def test_tied_weight_appears_once_and_carries_every_use() -> None:
    model = tiny_model("gpt2")  # lm_head is tied to the token embeddings
    assert model.lm_head.weight is model.transformer.wte.weight
    profile = profile_model(model, BATCH, 16)
    assert "lm_head.weight" not in profile.names
    assert "transformer.wte.weight" in profile.names
    # Training the tied embedding alone pays the LM head's weight gradient and every activation gradient.
    alone = profile.tensor_flops("transformer.wte.weight")
    assert alone.bwd_act == profile.full.bwd_act
    assert alone.bwd_weight > 0


def test_meta_device_and_real_weights_give_the_same_profile() -> None:
    real = profile_model(tiny_model("qwen2"), BATCH, 24)
    meta = profile_model(tiny_model("qwen2", device="meta"), BATCH, 24)
    assert real.names == meta.names
    assert real.act_terms == meta.act_terms and real.weight_terms == meta.weight_terms
    assert real.fwd == meta.fwd


def test_profiling_leaves_the_model_as_it_was() -> None:
    model = tiny_model("llama", attn_implementation="sdpa")
    model.eval()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    profile_model(model, BATCH, 16)
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    for name, param in model.named_parameters():
        obj, value, requires_grad = before[name]
        assert param is obj and param.requires_grad == requires_grad
        assert param.device.type == "cpu" and torch.equal(param.detach(), value)


def test_attention_is_counted_as_the_model_runs_it_or_as_named() -> None:
    # SDPA's backward costs one more matmul per layer than eager's (tests/test_attention_flops.py).
    sdpa = tiny_model("mistral", attn_implementation="sdpa")
    eager = tiny_model("mistral", attn_implementation="eager")
    assert profile_model(sdpa, BATCH, 32).full.total > profile_model(eager, BATCH, 32).full.total
    assert profile_model(sdpa, BATCH, 32, attention="eager").full == profile_model(eager, BATCH, 32).full
    assert profile_model(eager, BATCH, 32, attention="sdpa").full == profile_model(sdpa, BATCH, 32).full
    assert attention_of(sdpa) == ("sdpa",) and attention_of(eager) == ("eager",)


def test_encoder_decoder_target_length() -> None:
    model = tiny_model("t5")
    profile = profile_model(model, BATCH, 40, target_len=12)
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(3, 90, (BATCH, 40), generator=g),
        "attention_mask": torch.ones(BATCH, 40, dtype=torch.long),
        "labels": torch.randint(3, 90, (BATCH, 12), generator=g),
    }
    for mask in masks_to_check(profile.names, seed=3)[:12]:
        assert profile.step_flops(mask).total == measure_step_flops(model, batch, mask)


def test_combine_sums_steps_of_several_shapes() -> None:
    model = tiny_model("gpt_neox", device="meta")
    short, long = profile_model(model, BATCH, 8), profile_model(model, BATCH, 40)
    epoch = TensorProfile.combine([(short, 3), (long, 2)])
    for mask in masks_to_check(short.names, seed=5):
        expected = short.step_flops(mask).scaled(3) + long.step_flops(mask).scaled(2)
        assert epoch.step_flops(mask) == expected
    with pytest.raises(ValueError):
        TensorProfile.combine([(short, 1), (profile_model(tiny_model("gpt2"), BATCH, 8), 1)])


def test_mask_forms() -> None:
    profile = profile_model(tiny_model("opt", device="meta"), BATCH, 8)
    first = profile.names[0]
    as_bools = [n == first for n in profile.names]
    assert profile.step_flops(as_bools) == profile.step_flops([first]) == profile.tensor_flops(first)
    assert profile.step_flops([False] * len(profile.names)) == StepFlops(profile.fwd, 0, 0)
    # No names (an empty selection) trains nothing, like an all-False mask.
    assert profile.step_flops([]) == profile.step_flops(()) == StepFlops(profile.fwd, 0, 0)
    with pytest.raises(ValueError):
        profile.step_flops([True])
    with pytest.raises(KeyError):
        profile.step_flops(["no.such.tensor"])
    with pytest.raises(ValueError):
        profile_model(tiny_model("opt", device="meta"), 0, 8)


def test_torch_internals_the_profile_relies_on() -> None:
    """Guards for what the profile reads from torch: if one breaks, the profile's exactness is at risk."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    for op in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution, aten.convolution_backward):
        assert op in flop_registry

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.extend((func, a.grad_fn) for a in args if isinstance(a, torch.Tensor))
            return func(*args, **(kwargs or {}))

    w = torch.nn.Parameter(torch.ones(4, 4, device="meta"))
    x = torch.ones(3, 4, device="meta", requires_grad=True) * 2
    with Spy():
        y = x @ w
    # Inside dispatch, an op's inputs still show the autograd node they come from.
    assert any(func is aten.mm.default and grad_fn is x.grad_fn for func, grad_fn in seen)
    assert y.grad_fn.next_functions[1][0].variable is w
    assert y.grad_fn is y.grad_fn  # node wrappers are stable, so they can key a dict


def test_profile_command(tmp_path: Path) -> None:
    config = tiny_config("llama")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.config.save_pretrained(tmp_path)  # the command reads only config.json
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "profile", str(tmp_path), "--batch-size", "2", "--seq-len", "32"],
        capture_output=True,
        text=True,
        check=True,
    )
    profile = profile_model(model, 2, 32)
    assert f"rho_min: {profile.rho_min:.4f}" in result.stdout
    assert "model.layers.0.self_attn.q_proj.weight" in result.stdout
    assert f"{profile.full.total:.3e}" in result.stdout

    bad = subprocess.run(
        [sys.executable, "-m", "api.cli", "profile", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "config.json" in bad.stderr


def test_a_budget_of_rho_min_pays_for_the_cheapest_step() -> None:
    for arch in ("gpt2", "t5", "bert"):
        profile = profile_model(tiny_model(arch, device="meta"), 3, 17)
        cheapest = min(profile.step_flops({n}).total for n in profile.names)
        assert profile.rho_min * profile.full.total >= cheapest
