"""Precision (fp32, bf16-mixed, bf16), gradient checkpointing and micro-batches in greencore.train on tiny
models: the FLOPs stay exact under each precision, attention and checkpointing, tensors that never trained
stay bit-identical to a float32 base, bf16 holds frozen tensors in bf16 and trained ones (with their AdamW
state) in float32, and micro-batches give the whole batch's update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import greencore.train
from greencore.precision import HeldPrecision
from greencore.spec import Precision
from tests.test_train import check_records, run, saved_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_flops_exact_and_untouched_tensors_bit_identical(
    folders, data, tmp_path, precision, attention, checkpointing
):
    _, report, seen, steps = run(
        folders,
        data,
        tmp_path,
        "llama",
        "messages",
        "green",
        rho=0.6,
        precision=precision,
        attention=attention,
        gradient_checkpointing=checkpointing,
    )
    check_records(report, seen, steps, rho=0.6)
    for e in report.epochs:
        assert e.flops["measured_step"] == e.flops["predicted_step"], (e.epoch, e.flops)
    trained = {n for e in report.epochs for n in e.selected_tensors}
    base, final = saved_tensors(folders["llama"]), saved_tensors(Path(report.final_checkpoint_dir))
    assert all(t.dtype == torch.float32 for t in base.values())  # a float32 base: bf16 cannot hold it
    untouched = set(base) - trained
    assert untouched
    for name in untouched:
        assert torch.equal(final[name], base[name]), name
    assert any(not torch.equal(final[n], base[n]) for n in trained)


def test_bf16_holds_frozen_tensors_in_bf16_and_trained_ones_in_float32(folders, data, tmp_path, monkeypatch):
    real_step = greencore.train._optimizer_step
    seen: list[dict] = []

    def spy(run) -> None:
        params = dict(run.model.named_parameters())
        chosen = set(run.choice.names)
        seen.append(
            {
                "trained": {n: p.dtype for n, p in params.items() if n in chosen},
                "frozen": {n: p.dtype for n, p in params.items() if n not in run.trained and p.dim() >= 2},
                "vectors": {p.dtype for n, p in params.items() if p.dim() < 2},
                "grads": {n for n, p in params.items() if p.grad is not None},
                "chosen": chosen,
            }
        )
        real_step(run)
        state = run.optimizer.state
        ids = {id(p): n for n, p in params.items()}
        seen[-1]["state"] = {ids[id(p)]: {v.dtype for v in s.values() if v.dim()} for p, s in state.items()}

    monkeypatch.setattr(greencore.train, "_optimizer_step", spy)
    _, report, _, _ = run(folders, data, tmp_path, "llama", "messages", "green", rho=0.5, precision="bf16")
    first = seen[0]
    assert first["chosen"] and first["frozen"]
    assert set(first["trained"].values()) == {torch.float32}
    assert set(first["frozen"].values()) == {torch.bfloat16}  # frozen matrices
    assert first["vectors"] == {torch.float32}  # norms and biases stay float32
    assert first["grads"] <= first["chosen"]  # frozen tensors hold no gradient...
    assert set(first["state"]) == first["chosen"]  # ...and no optimizer state
    assert all(dtypes == {torch.float32} for dtypes in first["state"].values())
    # A tensor trained in epoch 1 stays float32 in epoch 2, trained or not (it holds AdamW state).
    last = seen[-1]
    assert set(last["trained"].values()) == {torch.float32}
    assert report.epochs[-1].train_loss < report.epochs[0].train_loss * 1.5


def test_held_precision_puts_back_exactly_what_it_held() -> None:
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    held = HeldPrecision(model, Precision.BF16)
    names = list(before)
    held.narrow(keep=names[:1])
    params = dict(model.named_parameters())
    assert params[names[0]].dtype == torch.float32 and params[names[1]].dtype == torch.bfloat16
    narrowed = params[names[1]].detach().clone()
    pointer = params[names[1]].data_ptr()
    with held.widened(names[1:3]):
        assert params[names[1]].dtype == torch.float32
        assert torch.equal(params[names[1]], before[names[1]])  # the original, not the bf16 value
        params[names[1]].data.add_(1.0)  # a tentative step
    assert params[names[1]].data_ptr() == pointer and torch.equal(params[names[1]], narrowed)
    held.widen([names[2]])
    assert params[names[2]].dtype == torch.float32 and torch.equal(params[names[2]], before[names[2]])
    exported = held.originals(model.state_dict())
    for n in names:
        assert torch.equal(exported[n], before[n]), n
    # Other precisions change nothing.
    other = tiny_model("llama")
    HeldPrecision(other, Precision.BF16_MIXED).narrow()
    assert all(p.dtype == torch.float32 for p in other.parameters())


@pytest.mark.parametrize("method", ["full", "green"])
def test_micro_batches_give_the_whole_batch_update(folders, data, tmp_path, method):
    # batch 4 in micro-batches of 3 (3 + 1 rows, unequal target tokens) against one batch of 4: the same
    # selections, FLOPs, losses and weights up to float rounding.
    rho = {"rho": 0.6} if method == "green" else {}
    _, whole, _, _ = run(folders, data, tmp_path / "a", "llama", "messages", method, **rho)
    _, micro, seen, steps = run(
        folders, data, tmp_path / "b", "llama", "messages", method, micro_batch_size=3, **rho
    )
    check_records(micro, seen, steps, rho=rho.get("rho"))
    for a, b in zip(whole.epochs, micro.epochs, strict=True):
        assert a.selected_tensors == b.selected_tensors
        assert a.flops == b.flops
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-5)
        assert b.valid_loss == pytest.approx(a.valid_loss, rel=1e-5)
    wa = saved_tensors(Path(whole.final_checkpoint_dir))
    wb = saved_tensors(Path(micro.final_checkpoint_dir))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)


def test_micro_batch_weights_are_shares_of_the_loss_terms() -> None:
    from greencore.data import IGNORE
    from greencore.train import micro_batches

    ids = torch.arange(24).reshape(4, 6)
    labels = ids.clone()
    labels[0, :5] = IGNORE  # 1 target after the shift by one
    labels[1, :2] = IGNORE  # 4
    # rows 2 and 3: 5 each
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    parts = micro_batches(batch, "causal_lm", 3)
    assert [p["input_ids"].shape[0] for p, _ in parts] == [3, 1]
    assert [w for _, w in parts] == pytest.approx([10 / 15, 5 / 15])
    assert micro_batches(batch, "causal_lm", None) == [(batch, 1.0)]
    cls = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    assert [w for _, w in micro_batches(cls, "classification", 3)] == pytest.approx([0.75, 0.25])


def test_checkpointing_recomputes_without_changing_the_training(folders, data, tmp_path):
    # The recompute is counted (measured_step == predicted_step, above); here: the same selections, losses
    # and weights as without it (the tiny Llama has no dropout), and more FLOPs per step.
    _, plain, _, _ = run(folders, data, tmp_path / "a", "llama", "messages", "green", rho=0.6)
    _, ckpt, _, _ = run(
        folders, data, tmp_path / "b", "llama", "messages", "green", rho=0.6, gradient_checkpointing=True
    )
    for a, b in zip(plain.epochs, ckpt.epochs, strict=True):
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-6)
        assert b.flops["full"] > a.flops["full"]  # full fine-tuning with checkpointing recomputes too
    wa = saved_tensors(Path(plain.final_checkpoint_dir))
    wb = saved_tensors(Path(ckpt.final_checkpoint_dir))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "kind", "fmt"),
    [
        ("full", "llama", "messages"),
        ("lora", "bert", "text_label"),
        ("topk", "t5", "prompt_completion"),
        # a trained float32 tensor upstream of a frozen LayerNorm: its input is float32 (MiniLM in bench)
        ("green", "bert", "text_label"),
    ],
)
def test_every_method_trains_in_bf16(folders, data, tmp_path, method, kind, fmt):
    hp = {"topk_layers": 1} if method == "topk" else {"rho": 0.6} if method == "green" else {}
    _, report, seen, steps = run(folders, data, tmp_path, kind, fmt, method, precision="bf16", **hp)
    check_records(report, seen, steps)
    for e in report.epochs:
        assert e.flops["measured_step"] == e.flops["predicted_step"]
    base, final = saved_tensors(folders[kind]), saved_tensors(Path(report.final_checkpoint_dir))
    # A BERT base folder names its tensors without the classifier's "bert." prefix.
    named = {n: final[n] if n in final else final["bert." + n] for n in base}
    changed = {n for n in base if not torch.equal(named[n], base[n])}
    assert changed  # something trained
    if method != "full":
        assert set(base) - changed  # and the rest kept the base's float32 values exactly


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5", "opt"])
def test_bf16_runs_with_any_tensor_trained_below_frozen_norms(family):
    # A float32 trained tensor upstream (here the first, an embedding) makes the stream float32 where frozen
    # norms follow: their parameters stay float32 (a bf16 LayerNorm refuses a float32 input on CPU).
    from greencore.precision import autocast
    from tests.tiny_models import batch_for, tiny_model

    model = tiny_model(family)
    names = [n for n, _ in model.named_parameters()]
    held = HeldPrecision(model, Precision.BF16)
    held.narrow(keep=names[:1])
    for n, p in model.named_parameters():
        p.requires_grad_(n == names[0])
        assert p.dtype == (torch.bfloat16 if n != names[0] and p.dim() >= 2 else torch.float32), n
    with autocast(Precision.BF16, "cpu"):
        loss = model(**batch_for(model, 2, 8)).loss
    loss.backward()
    assert dict(model.named_parameters())[names[0]].grad is not None
