"""The budget under the attention a run uses: CPU SDPA counted as torch counts CUDA's fused kernels, the
profile exact for SDPA's all-at-once backward, and a training run with attention="sdpa" whose measured step
is its predicted one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from greencore.flops import CPU_SDPA, CPU_SDPA_BACKWARD
from greencore.plan import ShapeProfiles
from greencore.profile import attention_of, measure_step_flops, profile_model
from greencore.spec import Attention, Hyperparameters, SpecError, TrainSpec
from greencore.train import train
from tests.model_folders import dataset, model_folder, write_jsonl
from tests.tiny_models import batch_for, tiny_model

aten = torch.ops.aten
B, H, S, D = 2, 4, 24, 8  # batch, query heads, tokens, head dim
LAYERS = 2  # of the tiny models
# Attention dropout sends CPU SDPA to its math path (bmm ops) in training; without it the fused kernel runs.
NO_ATTENTION_DROPOUT = {
    "gpt2": {"attn_pdrop": 0.0},
    "bert": {"attention_probs_dropout_prob": 0.0},
    "llama": {},
    "mistral": {},
}


def counted(fn) -> tuple[int, dict[str, int]]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


def qkv(kv_heads: int = H) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, S, D, generator=g, requires_grad=True)
    k = torch.randn(B, kv_heads, S, D, generator=g, requires_grad=True)
    v = torch.randn(B, kv_heads, S, D, generator=g, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"is_causal": True}, {"attn_mask": torch.zeros(B, 1, S, S)}, {"enable_gqa": True}],
    ids=["plain", "causal", "mask", "gqa"],
)
def test_cpu_sdpa_is_counted_as_torch_counts_cuda_kernels(kwargs) -> None:
    q, k, v = qkv(kv_heads=2 if kwargs.get("enable_gqa") else H)
    out: list[torch.Tensor] = []
    fwd, fwd_ops = counted(lambda: out.append(F.scaled_dot_product_attention(q, k, v, **kwargs)))
    bwd, bwd_ops = counted(lambda: out[0].sum().backward())
    assert set(fwd_ops) == {str(CPU_SDPA)} and set(bwd_ops) == {str(CPU_SDPA_BACKWARD)}
    # Two matmuls over every (query, key) pair forward, five backward; a causal mask changes nothing.
    assert fwd == 4 * B * H * S * S * D
    assert bwd == 10 * B * H * S * S * D
    # The same numbers as torch's own formulas for CUDA's flash kernel on the same shapes.
    out_ = out[0].detach()
    cuda_fwd = flop_registry[aten._scaled_dot_product_flash_attention](q, k, v, out_val=(out_,))
    cuda_bwd = flop_registry[aten._scaled_dot_product_flash_attention_backward](
        out_, q, k, v, out_val=(q, k, v)
    )
    assert (fwd, bwd) == (cuda_fwd, cuda_bwd)


def eager_attention_matmuls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / D**0.5, dim=-1) @ v


@pytest.mark.parametrize(
    ("attend", "backward_units"),
    [
        # Eager pays the gradient of each input that needs one (the scores' too, for q or k).
        (eager_attention_matmuls, {"q": 2, "k": 2, "v": 1, "qkv": 4}),
        # SDPA's kernel recomputes the scores and computes dq, dk and dv together, whichever are needed.
        (F.scaled_dot_product_attention, {"q": 5, "k": 5, "v": 5, "qkv": 5}),
    ],
    ids=["eager", "sdpa"],
)
def test_cpu_sdpa_forward_equals_eager_matmuls_and_its_backward_is_paid_whole(attend, backward_units) -> None:
    unit = 2 * B * H * S * S * D  # one batched matmul over every (query, key) pair
    for needs, units in backward_units.items():
        q, k, v = (t.detach().requires_grad_(name in needs) for name, t in zip("qkv", qkv(), strict=True))
        with FlopCounterMode(display=False) as fwd:
            out = attend(q, k, v)
        with FlopCounterMode(display=False) as bwd:
            out.sum().backward()
        assert fwd.get_total_flops() == 2 * unit  # forward: the same two matmuls
        assert bwd.get_total_flops() == units * unit, needs


def layer_masks(prefix: str) -> dict[str, set[str]]:
    """Masks that make only q, only k, only v, all three or none of them need a gradient in the last layer
    (nothing below it trains)."""
    return {
        "only q": {f"{prefix}.q_proj.weight"},
        "only k": {f"{prefix}.k_proj.weight"},
        "only v": {f"{prefix}.v_proj.weight"},
        "q, k and v": {f"{prefix}.{p}_proj.weight" for p in "qkv"},
        "none (o_proj)": {f"{prefix}.o_proj.weight"},
        "none (mlp)": {"model.layers.1.mlp.down_proj.weight"},
    }


def test_sdpa_backward_is_charged_once_whichever_of_q_k_v_need_a_gradient() -> None:
    sdpa = tiny_model("llama", attn_implementation="sdpa")
    eager = tiny_model("llama", attn_implementation="eager")
    batch = batch_for(sdpa, B, S)
    p_sdpa, p_eager = profile_model(sdpa, B, S), profile_model(eager, B, S)
    assert p_sdpa.fwd == p_eager.fwd
    unit = 2 * B * H * S * S * D
    for what, mask in layer_masks("model.layers.1.self_attn").items():
        predicted = p_sdpa.step_flops(mask)
        assert predicted.total == measure_step_flops(sdpa, batch, mask), what
        assert p_eager.step_flops(mask).total == measure_step_flops(eager, batch, mask), what
        # The difference is layer 1's attention backward: 5 matmuls for SDPA against eager's per-input ones.
        eager_units = {"only q": 2, "only k": 2, "only v": 1, "q, k and v": 4}.get(what, 0)
        sdpa_units = 5 if eager_units else 0
        assert predicted.bwd_act - p_eager.step_flops(mask).bwd_act == (sdpa_units - eager_units) * unit, what
    # Every layer: four matmuls eager, five SDPA.
    assert p_sdpa.full.total - p_eager.full.total == LAYERS * unit


@pytest.mark.parametrize("arch", sorted(NO_ATTENTION_DROPOUT))
def test_fused_cpu_kernel_is_profiled_exactly(arch: str) -> None:
    model = tiny_model(arch, attn_implementation="sdpa", **NO_ATTENTION_DROPOUT[arch])
    batch = batch_for(model, B, S)
    _, ops = counted(lambda: model(**batch).loss.backward())
    assert str(CPU_SDPA) in ops and str(CPU_SDPA_BACKWARD) in ops  # the fused kernel ran, and was counted
    profile = profile_model(model, B, S)
    masks = [set(profile.names)] + [{n} for n in profile.names]
    for mask in masks:
        assert profile.step_flops(mask).total == measure_step_flops(model, batch, mask), sorted(mask)


def test_profiles_of_each_attention_are_cached_apart() -> None:
    model = tiny_model("llama", attn_implementation="sdpa")
    shapes = [(2, 16)]
    own = ShapeProfiles(model).steps(shapes)
    forced = ShapeProfiles(model, attention="eager").steps(shapes)
    assert attention_of(model)[0] == "sdpa"  # forcing is scoped to the profiling
    assert own.full == profile_model(model, 2, 16).full
    assert forced.full == profile_model(model, 2, 16, attention="eager").full
    assert own.full.total > forced.full.total


def test_attention_setting_is_checked() -> None:
    assert Hyperparameters().attention == Attention.AUTO == "auto"
    Hyperparameters(attention="sdpa").check()
    with pytest.raises(SpecError, match="attention: must be one of auto, eager, sdpa"):
        Hyperparameters(attention="flash").check()


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention")
    return {
        "llama": model_folder("llama", root / "llama"),
        "bloom": _bloom_folder(root / "bloom"),
        "train": write_jsonl(root / "train.jsonl", dataset("messages", 64, seed=0, long_every=16)),
        "valid": write_jsonl(root / "valid.jsonl", dataset("messages", 8, seed=1)),
    }


def _bloom_folder(folder):
    from greencore.demo import build_tokenizer
    from tests.tiny_models import TINY, tiny_config

    tokenizer = build_tokenizer(chat_template=None)
    config = tiny_config("bloom", vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    TINY["bloom"][1].from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def spec(run_files, tmp_path, model: str = "llama", **hp) -> TrainSpec:
    return TrainSpec(
        model_dir=str(run_files[model]),
        train_file=str(run_files["train"]),
        valid_file=str(run_files["valid"]),
        output_dir=str(tmp_path / "out"),
        method="green",
        hyperparameters=Hyperparameters(
            **{"n_epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "max_seq_len": 96, "rho": 0.6, **hp}
        ),
    )


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_run_predicts_its_measured_step_exactly(run_files, tmp_path, attention: str) -> None:
    report = train(spec(run_files, tmp_path, attention=attention))
    assert len(report.epochs) == 2
    for epoch in report.epochs:
        f = epoch.flops
        assert f["measured_step"] == f["predicted_step"] > 0
        assert epoch.rho_achieved <= 0.6 and f["total"] <= 0.6 * f["full"]


@pytest.mark.usefixtures("one_thread")
def test_an_attention_the_model_lacks_is_refused(run_files, tmp_path) -> None:
    with pytest.raises(SpecError, match="attention") as caught:
        train(spec(run_files, tmp_path, model="bloom", attention="sdpa", n_epochs=1))
    assert caught.value.field == "attention"
