"""greencore.reselect: the budget of a selection interval, its exact rho_min, the automatic reselect_every,
and what a refusal names; on the tiny demo Llama, planned as the estimate and the run plan it."""

from __future__ import annotations

import pytest

from greencore.data import encode_dataset, validate_dataset
from greencore.demo import build_tokenizer
from greencore.estimate import run_costs
from greencore.methods import make_method
from greencore.reselect import (
    IntervalCosts,
    auto_every,
    fit_advice,
    interval_budgets,
    interval_costs,
    run_epochs,
    run_rho_min,
)
from greencore.select import reachable_tensors
from greencore.spec import EnergySettings, Hyperparameters, SpecError, TrainSpec
from greencore.train import train
from tests.model_folders import dataset, model_folder, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return model_folder("llama", tmp_path_factory.mktemp("models") / "llama")


def costing(llama, tmp_path, examples: int, **hp):
    data_file = write_jsonl(tmp_path / f"d{examples}.jsonl", dataset("messages", examples, seed=0))
    hp = Hyperparameters(**{"n_epochs": 3, "batch_size": 8, "max_seq_len": 96, "rho": 0.5, **hp})
    data = encode_dataset(validate_dataset(data_file), build_tokenizer(), "causal_lm", hp.max_seq_len, None)
    return run_costs(llama, data, "green", hp, 0)


def test_selection_every_epoch_on_epochs_of_enough_steps_is_the_papers(llama, tmp_path) -> None:
    # 64 examples at batch 4: 16 steps an epoch. Every epoch selects, measuring what it always measured.
    costs = costing(llama, tmp_path, 64, batch_size=4)
    epochs = run_epochs(costs.costing)
    assert auto_every(epochs, 0.5) == 1 and costs.settings(costs.costing.hp, 0.5) == {"reselect_every": 1}
    for interval in interval_costs(epochs, 1):
        for rho in (0.45, 0.5, 0.6, 0.8):
            target, reserved = interval.selection_budget(rho, 0)
            assert interval.candidates(rho)[0] == reachable_tensors(interval.loop, target) and reserved == 0


def test_rho_min_is_exact_and_every_larger_budget_trains(llama, tmp_path) -> None:
    costs = costing(llama, tmp_path, 24)
    for every in (1, 2, 3):
        for interval in interval_costs(run_epochs(costs.costing), every):
            rho_min = interval.rho_min()
            assert not interval.candidates(rho_min * (1 - 1e-6))[0]
            for step in range(40):  # feasibility is monotone in rho: a larger budget never refuses
                rho = rho_min + (1 - rho_min) * step / 39
                names, spent = interval.candidates(rho)
                assert names, rho
                # The cheapest candidate can still train after the importance passes are paid.
                assert (
                    min(interval.loop.tensor_flops(n).total for n in names) <= interval.allowed(rho) - spent
                )


def test_a_small_dataset_selects_once_for_the_run_and_fits(llama, tmp_path) -> None:
    # 24 examples at batch 8: 3 steps an epoch. Per epoch the passes do not fit rho 0.5; over the run they do.
    costs = costing(llama, tmp_path, 24)
    epochs = run_epochs(costs.costing)
    assert costs.steps_per_epoch == 3 and auto_every(epochs, 0.5) == 3
    assert run_rho_min(epochs, 1) > 0.5 > costs.rho_min == run_rho_min(epochs, 3)
    assert costs.resolve_rho(costs.costing.hp, EnergySettings()) == 0.5
    # Where a selection every epoch fits the budget, every epoch selects and keeps rho on its own.
    per_epoch = run_rho_min(epochs, 1)
    assert auto_every(epochs, per_epoch) == 1 == auto_every(epochs, 0.9)
    assert costs.settings(costs.costing.hp, 0.9) == {"reselect_every": 1}


def test_importance_on_fewer_rows_costs_proportionally_less(llama, tmp_path) -> None:
    whole = costing(llama, tmp_path, 24, reselect_every=1)
    part = costing(llama, tmp_path, 24, reselect_every=1, importance_rows=2)
    for w, p in zip(whole.costing.importance, part.costing.importance, strict=True):
        assert (w.batch_size, p.batch_size) == (1, 1)  # combined from one-row profiles
        assert p.full.total < w.full.total / 3  # 2 rows of 8 (padded to their own longest)
    assert part.costing.after_first == [None] * 3  # the first step is no longer the importance pass's
    assert part.rho_min < 0.5 < whole.rho_min


def test_a_refusal_names_changes_that_fit_with_their_rho_min(llama, tmp_path) -> None:
    costs = costing(llama, tmp_path, 24, reselect_every=1)
    advice = fit_advice(costs.costing, 0.5)
    kinds = [a.split("=")[0].split(" ")[0] for a in advice]
    assert kinds == ["reselect_every", "importance_rows", "batch_size", "48"], advice
    # Each is exact: the run planned again with that change has that rho_min.
    assert advice[0] == f"reselect_every=3 (rho_min {run_rho_min(run_epochs(costs.costing), 3):.4f})"
    rows = int(advice[1].split("=")[1].split(" ")[0])
    again = costing(llama, tmp_path, 24, reselect_every=1, importance_rows=rows)
    assert f"(rho_min {again.rho_min:.4f})" in advice[1] and again.rho_min <= 0.5
    # Below what the forward pass and the cheapest tensor cost, nothing but a larger rho helps.
    assert fit_advice(costs.costing, 0.3) == []


def test_interval_budget_spreads_one_pass_over_its_epochs(llama, tmp_path) -> None:
    costs = costing(llama, tmp_path, 24)
    epochs = run_epochs(costs.costing)
    (one,) = interval_costs(epochs, 3)
    assert one.full == sum(e.full for e in epochs)
    first = epochs[0]
    assert first.after_first is not None  # the first step is the importance pass's
    alone = IntervalCosts.of(first)
    assert alone.loop.full.total == first.after_first.full.total and alone.full == first.full


def test_a_front_budget_spends_more_early_and_rho_over_the_run(llama, tmp_path) -> None:
    costs = costing(llama, tmp_path, 64, batch_size=4, n_epochs=4)
    epochs = run_epochs(costs.costing)
    total = sum(e.full for e in epochs)
    assert interval_budgets(epochs, 1, 0.6, "even") == [0.6] * 4
    budgets = interval_budgets(epochs, 1, 0.6, "front")  # 1.2 x rho falling to 0.8 x rho
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) == 4
    assert budgets[0] == pytest.approx(0.72, rel=0.01) and budgets[-1] == pytest.approx(0.48, rel=0.01)
    spent = sum(b * e.full for b, e in zip(budgets, epochs, strict=True))
    assert 0.6 * total * (1 - 1e-9) <= spent <= 0.6 * total  # the whole run's rho, never above it
    # Intervals of two epochs: each interval's budget is its epochs' weights, the run still within rho.
    two = interval_budgets(epochs, 2, 0.6, "front")
    assert len(two) == 2 and two[0] > 0.6 > two[1]
    assert (
        two[0] * (epochs[0].full + epochs[1].full) + two[1] * (epochs[2].full + epochs[3].full) <= 0.6 * total
    )
    # One interval for the run: nothing to share.
    assert interval_budgets(epochs, 4, 0.6, "front") == [0.6]


def test_a_front_budget_flattens_where_an_epoch_would_not_train(llama, tmp_path) -> None:
    costs = costing(llama, tmp_path, 64, batch_size=4)
    epochs = run_epochs(costs.costing)
    floor = run_rho_min(epochs, 1)
    # Just above the run's rho_min the last epoch cannot give anything up: every epoch gets rho, as even.
    rho = floor * 1.001
    assert interval_budgets(epochs, 1, rho, "front") == [rho] * 3
    # Near 1 the first epoch cannot take more than all of full fine-tuning.
    assert interval_budgets(epochs, 1, 1.0, "front") == [1.0] * 3
    # Between, the slope is as steep as every epoch allows: each trains, none above 1.
    rho = floor + 0.03
    budgets = interval_budgets(epochs, 1, rho, "front")
    floors = [c.rho_min() for c in interval_costs(epochs, 1)]
    assert all(f <= b <= 1 for f, b in zip(floors, budgets, strict=True))
    assert budgets[0] > rho > budgets[-1]


@pytest.mark.parametrize("method", ["full", "topk", "lora"])
def test_only_green_takes_a_front_budget(method) -> None:
    with pytest.raises(SpecError, match="budget_schedule"):
        make_method(method, Hyperparameters(budget_schedule="front")).check()
    make_method("green", Hyperparameters(budget_schedule="front")).check()
    with pytest.raises(SpecError, match="budget_schedule"):
        Hyperparameters(budget_schedule="back").check()


def test_a_front_budget_run_spends_as_its_estimate_plans(llama, tmp_path) -> None:
    hp = {"n_epochs": 3, "batch_size": 4, "max_seq_len": 96, "rho": 0.6, "budget_schedule": "front"}
    costs = costing(llama, tmp_path, 64, **hp)
    planned = interval_budgets(run_epochs(costs.costing), 1, 0.6, "front")
    spec = TrainSpec(
        model_dir=str(llama),
        train_file=str(tmp_path / "d64.jsonl"),
        output_dir=str(tmp_path / "out"),
        hyperparameters=Hyperparameters(**hp),
    )
    report = train(spec)
    assert [e.selection["interval_rho"] for e in report.epochs] == planned
    for e, budget in zip(report.epochs, planned, strict=True):
        assert e.flops["total"] <= budget * e.flops["full"]
    assert report.epochs[0].rho_achieved > 0.6 > report.epochs[-1].rho_achieved
    assert sum(e.flops["total"] for e in report.epochs) <= 0.6 * sum(e.flops["full"] for e in report.epochs)
    # The estimate's memory bound covers what the first epoch's larger budget can reach.
    bound = set(make_method("green", Hyperparameters(**hp)).memory_plan(costs.costing, 0.6).trained)
    assert {n for e in report.epochs for n in e.selected_tensors} <= bound
