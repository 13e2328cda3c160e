"""Peak memory on fake tensors (greencore.memory) against a live-storage tracker on real CPU steps of tiny
models: the estimate equals the measurement within max(1%, 32 KiB). The rest is buffers a meta model builds
differently from a loaded one (position ids, causal-mask buffers: a few KiB on these 30-100K parameter models,
nothing at scale); the tracker counts storages as ops return them, so allocator rounding does not enter."""

from __future__ import annotations

import pytest
import torch

from greencore.importance import importance_pass, tentative_optimizer_factory
from greencore.memory import LiveStorages, importance_bytes, peak_shapes, train_step_bytes, warm_optimizer
from greencore.profile import attention_implementation
from greencore.spec import Hyperparameters
from tests.tiny_models import batch_for, tiny_model

HP = Hyperparameters()
SLACK_BYTES = 32 << 10


def _task(model: torch.nn.Module, batch: dict) -> tuple[str, tuple[int, ...]]:
    b, s = batch["input_ids"].shape
    if model.config.is_encoder_decoder:
        return "seq2seq", (b, s, batch["labels"].shape[1])
    return ("classification" if batch["labels"].dim() == 1 else "causal_lm"), (b, s)


def _optimizer(model: torch.nn.Module, trained: set[str]) -> tuple[list, torch.optim.Optimizer]:
    """train's AdamW over the trainable tensors, after its first step (moments held)."""
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    params = [p for p in model.parameters() if p.requires_grad]
    return params, warm_optimizer(params, HP)


def _tracker(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> LiveStorages:
    tracker = LiveStorages()
    state = [v for s in opt.state.values() for v in s.values()]
    tracker.add([*model.parameters(), *model.buffers(), *state, *batch.values()])
    return tracker


def measured_step(model: torch.nn.Module, batch: dict, trained: set[str], attention: str = "eager") -> int:
    """Peak live bytes of one real training step as greencore.train runs it on CPU."""
    params, opt = _optimizer(model, trained)
    tracker = _tracker(model, opt, batch)
    model.train()
    with attention_implementation(model, attention), tracker:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], HP.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return tracker.peak_bytes


def _padded(batch: dict) -> dict:
    """``batch`` with padding in its first and last rows (so in every micro-batch of 2), as most of a run's
    batches have: the replay cannot see that a mask is all ones, so it holds what a padded batch needs (a
    batch without padding needs a little less)."""
    padded = {**batch, "attention_mask": batch["attention_mask"].clone()}
    padded["attention_mask"][0, -3:] = 0
    padded["attention_mask"][-1, -2:] = 0
    return padded


def _close(estimate: int, measured: int) -> bool:
    return abs(estimate - measured) <= max(0.01 * measured, SLACK_BYTES)


FAMILIES = ["llama", "gpt2", "opt", "qwen2", "t5", "bert"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ["all", "head", "deep"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_train_step_estimate_equals_measured_peak(family: str, which: str, attention: str) -> None:
    model = tiny_model(family)
    if attention == "sdpa" and not model._supports_sdpa:
        pytest.skip(f"{family} has no SDPA attention")
    names = [n for n, _ in model.named_parameters()]
    trained = {"all": names, "head": names[-1:], "deep": names[1:2]}[which]
    batch = batch_for(model, 4, 32)
    task, shape = _task(model, batch)
    hp = Hyperparameters(attention=attention)
    estimate = train_step_bytes(tiny_model(family, device="meta"), trained, shape, task, hp)
    measured = measured_step(model, _padded(batch), set(trained), attention)
    assert _close(estimate, measured), (estimate, measured)
    assert estimate >= measured_step(model, batch, set(trained), attention) - SLACK_BYTES


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_importance_estimate_equals_measured_peak(family: str) -> None:
    model = tiny_model(family)
    names = [n for n, _ in model.named_parameters()]
    candidates = names[len(names) // 2 :]
    batch = batch_for(model, 4, 32)
    task, shape = _task(model, batch)
    _, opt = _optimizer(model, set(candidates))
    tracker = _tracker(model, opt, batch)
    with attention_implementation(model, "eager"), tracker:
        importance_pass(model, [batch], tentative_optimizer_factory(opt), names=candidates)
    hp = Hyperparameters(attention="eager")
    estimate = importance_bytes(tiny_model(family, device="meta"), candidates, candidates, shape, task, hp)
    assert _close(estimate, tracker.peak_bytes), (estimate, tracker.peak_bytes)


def test_frozen_tensors_hold_no_gradient_nor_optimizer_state() -> None:
    model = tiny_model("llama")
    names = [n for n, _ in model.named_parameters()]
    trained = set(names[-3:])
    params, opt = _optimizer(model, trained)
    model(**batch_for(model, 2, 16)).loss.backward()
    frozen = [p for n, p in model.named_parameters() if n not in trained]
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trained)
    opt.step()
    held = {id(p) for p in opt.state}
    assert held == {id(p) for n, p in model.named_parameters() if n in trained}
    assert not any(id(p) in held for p in frozen)


def test_shallow_training_keeps_fewer_activations() -> None:
    # Same number of trained bytes (one norm vector each): the deep one keeps every layer's activations.
    meta = tiny_model("llama", device="meta")
    names = [n for n, _ in meta.named_parameters()]
    deep = next(n for n in names if n.endswith("layers.0.input_layernorm.weight"))
    shallow = "model.norm.weight"
    shape = (4, 32)
    assert train_step_bytes(meta, [shallow], shape, "causal_lm", HP) < train_step_bytes(
        meta, [deep], shape, "causal_lm", HP
    )
    # and nothing trained: only what the model and the batch hold
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    assert weights <= train_step_bytes(meta, [], shape, "causal_lm", HP) < weights + SLACK_BYTES


def test_peak_shapes_keep_the_uncovered_ones() -> None:
    assert peak_shapes([(4, 32), (4, 16), (2, 64), (1, 64), (4, 32)]) == [(4, 32), (2, 64)]


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16"])
@pytest.mark.parametrize("micro", [None, 2])
def test_precision_and_micro_batches_estimate_equals_measured_peak(family, precision, micro) -> None:
    # A real step as greencore.train runs it: frozen tensors narrowed (bf16), the trained ones float32, the
    # forwards under the run's autocast, the batch's micro-batches accumulated.
    from greencore.precision import HeldPrecision, autocast
    from greencore.train import micro_batches

    hp = Hyperparameters(attention="eager", precision=precision, micro_batch_size=micro)
    model = tiny_model(family)
    names = [n for n, _ in model.named_parameters()]
    trained = set(names[len(names) // 2 :])
    held = HeldPrecision(model, hp.precision)
    held.narrow(keep=trained)
    params, opt = _optimizer(model, trained)
    assert all(p.dtype == torch.float32 for p in params)
    if precision == "bf16":
        frozen = [p for n, p in model.named_parameters() if n not in trained and p.dim() >= 2]
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    batch = _padded(batch_for(model, 4, 32))
    task, shape = _task(model, batch)
    tracker = _tracker(model, opt, batch)
    model.train()
    with attention_implementation(model, "eager"), tracker:
        for part, weight in micro_batches(batch, task, micro):
            with autocast(hp.precision, "cpu"):
                loss = model(**part).loss
            (loss * weight).backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], HP.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    estimate = train_step_bytes(tiny_model(family, device="meta"), trained, shape, task, hp)
    assert _close(estimate, tracker.peak_bytes), (estimate, tracker.peak_bytes)


def test_bf16_and_micro_batches_need_less_memory() -> None:
    meta = tiny_model("llama", device="meta", hidden_size=256, intermediate_size=512)
    names = [n for n, _ in meta.named_parameters()]
    shape = (8, 64)

    def peak(**hp) -> int:
        return train_step_bytes(meta, names[-4:], shape, "causal_lm", Hyperparameters(**hp))

    assert peak(precision="bf16") < 0.7 * peak(precision="fp32")  # frozen weights at half
    assert peak(micro_batch_size=2) < peak()  # activations of 2 rows, not 8


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_no_activation_is_kept_below_the_deepest_trained_tensor(family: str) -> None:
    # Every tensor autograd saves for backward is noted with the transformer layer running when it was saved:
    # with only a tensor of the top layer trained, the layers below save nothing (their outputs need no
    # gradient); with a tensor of the bottom layer trained, every layer saves.
    from greencore.profile import checkpointable_layers

    model = tiny_model(family)
    layers = checkpointable_layers(model)  # the transformer blocks, in model order
    running: list[int] = []
    saved_in: list[int | None] = []

    def leave(_module, _args, _output) -> None:
        running.pop()

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda _m, _a, i=i: running.append(i))
        layer.register_forward_hook(leave)

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved_in.append(running[-1] if running else None)
        return t

    batch = batch_for(model, 2, 16)
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    for depth in (len(layers) - 1, 0):
        trained = next(names[id(p)] for p in layers[depth].parameters() if p.dim() == 2)
        for n, p in params.items():
            p.requires_grad_(n == trained)
        saved_in.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**batch).loss.backward()
        in_layers = {i for i in saved_in if i is not None}
        assert in_layers and min(in_layers) == depth, (trained, sorted(in_layers))
        if depth == 0:
            assert in_layers == set(range(len(layers)))
