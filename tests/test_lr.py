"""The automatic learning rate (greencore.lr): the rule's factors, each method's scale, and a run with
``learning_rate "auto"`` training at the rate its estimate gives."""

from __future__ import annotations

from dataclasses import replace

import pytest
from torch import nn

from greencore.data import encode_dataset, task_for, validate_dataset
from greencore.estimate import run_costs
from greencore.lr import (
    BASE_BATCH,
    BASE_LEARNING_RATE,
    BASE_PARAMS,
    FULL_SCALE,
    LORA_SCALE,
    MAX_SCALE,
    LearningRateBasis,
    budget_scale,
    full_learning_rate,
    non_embedding_params,
    reference_learning_rate,
)
from greencore.models import load_config
from greencore.spec import EnergySettings, Hyperparameters, SpecError, TrainSpec
from greencore.train import _load_tokenizer, train

pytestmark = pytest.mark.usefixtures("one_thread")

THIRD = 1 / 3  # the forward pass's share of a full fine-tuning step: FlopCounterMode counts backward as 2x


def test_the_rate_falls_with_size_and_rises_with_the_batch() -> None:
    base = LearningRateBasis(BASE_PARAMS, BASE_BATCH, THIRD)
    assert reference_learning_rate(base) == pytest.approx(BASE_LEARNING_RATE)
    assert full_learning_rate(base) == pytest.approx(FULL_SCALE * BASE_LEARNING_RATE)
    assert reference_learning_rate(LearningRateBasis(8 * BASE_PARAMS, BASE_BATCH, THIRD)) == pytest.approx(
        BASE_LEARNING_RATE / 2
    )
    assert reference_learning_rate(LearningRateBasis(BASE_PARAMS, 4 * BASE_BATCH, THIRD)) == pytest.approx(
        2 * BASE_LEARNING_RATE
    )
    # Full fine-tuning of a 7B model (6.5e9 parameters outside embeddings) at batch 16: about 2e-5.
    assert 1.5e-5 < full_learning_rate(LearningRateBasis(6_500_000_000, 16, THIRD)) < 2.5e-5


def test_a_budget_buys_a_larger_step_the_less_of_the_backward_it_trains() -> None:
    assert budget_scale(0.5, THIRD) == pytest.approx(4 ** (5 / 3))  # a quarter of the backward pass: x10
    scales = [budget_scale(rho, THIRD) for rho in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)]
    assert scales == sorted(scales) and scales[2] > FULL_SCALE
    # Near rho 1 a budget's factor would fall below full fine-tuning's: it is held there, so green at rho 1
    # (every tensor) takes full fine-tuning's rate, and no budget takes a smaller one.
    assert ((0.9 - THIRD) / (1 - THIRD)) ** (-5 / 3) < FULL_SCALE
    assert budget_scale(0.9, THIRD) == budget_scale(1.0, THIRD) == FULL_SCALE
    assert budget_scale(0.34, THIRD) == MAX_SCALE == budget_scale(0.2, THIRD)  # at or below rho_min: capped


def test_non_embedding_params_leave_out_tables_and_what_is_tied_to_them(folders) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folders["llama"])
    tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    total = sum(p.numel() for p in model.parameters())
    assert 0 < non_embedding_params(model) == total - tables


def test_a_learning_rate_is_a_positive_number_or_auto() -> None:
    Hyperparameters(learning_rate="auto").check()
    Hyperparameters(learning_rate=1e-3).check()
    for bad in ("fast", 0.0, -1e-3):
        with pytest.raises(SpecError) as refused:
            Hyperparameters(learning_rate=bad).check()
        assert refused.value.field == "learning_rate"


def costs_of(folders, data, kind: str, fmt: str, method: str, hp: Hyperparameters):
    model_dir = str(folders[kind])
    summary = validate_dataset(str(data[fmt]))
    task = task_for(summary.format, load_config(model_dir))
    labels = {name: i for i, name in enumerate(summary.labels)} if summary.labels else None
    encoded = encode_dataset(summary, _load_tokenizer(model_dir), task, hp.max_seq_len, labels)
    return run_costs(model_dir, encoded, method, hp, 0, len(labels) if labels else None)


def test_each_method_scales_the_reference_rate(folders, data) -> None:
    hp = {"n_epochs": 1, "batch_size": 4, "max_seq_len": 96}
    rates = {}
    for method, extra in (
        ("full", {}),
        ("green", {"rho": 0.6}),
        ("green", {"rho": 0.9}),
        ("lora", {}),
        ("topk", {"topk_layers": 1}),
    ):
        h = Hyperparameters(**hp, **extra)
        costs = costs_of(folders, data, "llama", "prompt_completion", method, h)
        forward = costs.lr_basis.forward_share
        assert 0.25 < forward < 0.4  # about a third
        rate = costs.estimate(h, EnergySettings()).learning_rate
        assert rate.learning_rate == pytest.approx(rate.full * rate.scale)
        assert rate.full == pytest.approx(full_learning_rate(costs.lr_basis))
        rates[method, extra.get("rho")] = rate
        if method == "topk":  # a fixed set: its share is its FLOPs over full fine-tuning's
            factor = budget_scale(costs.flops / costs.full, forward)
            assert rate.scale == pytest.approx(factor / FULL_SCALE)
    # Top-k within a budget: the share its planned layers spend (the largest k within rho), not rho.
    h = Hyperparameters(**hp, rho=0.7)
    costs = costs_of(folders, data, "llama", "prompt_completion", "topk", h)
    fixed = {}
    for k in range(1, 4):
        fixed[k] = costs_of(
            folders, data, "llama", "prompt_completion", "topk", Hyperparameters(**hp, topk_layers=k)
        )
    fits = [k for k, c in fixed.items() if c.flops <= 0.7 * c.full]
    share = fixed[max(fits)].flops / fixed[max(fits)].full
    assert share < 0.7 - 0.02  # the test is only worth something where the layers spend below the budget
    rate = costs.estimate(h, EnergySettings()).learning_rate
    assert rate.scale == pytest.approx(budget_scale(share, costs.lr_basis.forward_share) / FULL_SCALE)
    assert rate.scale > budget_scale(0.7, costs.lr_basis.forward_share) / FULL_SCALE
    full = rates["full", None]
    assert full.scale == 1.0 and full.learning_rate == full.full
    assert len({r.full for r in rates.values()}) == 1  # one model, one batch: one full fine-tuning rate
    # The scale reported is the method's rate over full fine-tuning's: its factor over full's factor.
    assert rates["green", 0.6].scale == pytest.approx(budget_scale(0.6, forward) / FULL_SCALE)
    assert rates["green", 0.9].learning_rate < rates["green", 0.6].learning_rate
    assert rates["green", 0.9].scale == pytest.approx(budget_scale(0.9, forward) / FULL_SCALE)
    assert rates["lora", None].scale == pytest.approx(LORA_SCALE / FULL_SCALE)


@pytest.mark.parametrize("method", ["green", "full"])
def test_an_auto_run_trains_at_its_estimates_rate_and_records_it(folders, data, tmp_path, method) -> None:
    hp = Hyperparameters(n_epochs=2, batch_size=4, max_seq_len=96, rho=0.6 if method == "green" else None)
    costs = costs_of(folders, data, "llama", "prompt_completion", method, hp)
    expected = costs.estimate(hp, EnergySettings()).learning_rate
    spec = TrainSpec(
        model_dir=str(folders["llama"]),
        train_file=str(data["prompt_completion"]),
        output_dir=str(tmp_path / "out"),
        method=method,
        hyperparameters=hp,
    )
    report = train(spec)
    assert [e.learning_rate for e in report.epochs] == [expected.learning_rate] * 2
    green_scale = budget_scale(0.6, costs.lr_basis.forward_share) / FULL_SCALE
    assert expected.scale == (1.0 if method == "full" else pytest.approx(green_scale))
    # Resuming resolves "auto" to the same rate: the checkpoint's fingerprint matches.
    again = train(replace(spec, resume_from=report.epochs[0].checkpoint_dir))
    assert [e.learning_rate for e in again.epochs] == [expected.learning_rate] * 2
