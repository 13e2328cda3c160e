"""What each method owns: LoRA's checkpoint is merge_and_unload's, computed without copying or changing the
trained model; the run's planner and the estimate's agree; a TrainingState round-trips."""

from __future__ import annotations

import copy

import pytest
import torch

from greencore.data import encode_dataset, validate_dataset
from greencore.demo import build_tokenizer
from greencore.estimate import run_costs
from greencore.methods import make_method
from greencore.plan import ShapeProfiles, plan_epoch
from greencore.profile import profile_model
from greencore.spec import Hyperparameters
from greencore.train import TrainingState
from tests.model_folders import dataset, model_folder, write_jsonl
from tests.tiny_models import tiny_model


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_lora_export_is_merge_and_unload_without_a_copy(kind: str) -> None:
    model = tiny_model(kind)
    new_modules = ["classifier"] if kind == "bert" else []
    wrapped, params = make_method("lora", Hyperparameters()).prepare(model, new_modules)
    torch.manual_seed(1)
    with torch.no_grad():  # trained adapters and head: B is zero at the start, which would hide the merge
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}

    export = make_method("lora", Hyperparameters()).export(wrapped)

    expected = copy.deepcopy(wrapped).merge_and_unload().state_dict()
    assert list(export.tensors) == list(expected)  # the base's names, in its order
    for name, tensor in expected.items():
        assert torch.equal(export.tensors[name], tensor), name  # bit for bit
    assert any(not torch.equal(export.tensors[n], tiny_model(kind).state_dict()[n]) for n in expected)
    for name, p in wrapped.named_parameters():  # the trained model is left exactly as it was
        assert torch.equal(p, before[name]), name
    assert export.hf_model is wrapped.get_base_model()


def test_the_estimate_plans_and_prices_what_the_run_trains(tmp_path) -> None:
    """The estimate's FLOPs for full fine-tuning are the run's planned steps, profiled at their real batch
    size: per-row profiles scale exactly with the batch."""
    folder = model_folder("llama", tmp_path / "llama")
    data_file = write_jsonl(tmp_path / "d.jsonl", dataset("messages", 22, seed=3, long_every=5))
    hp = Hyperparameters(n_epochs=2, batch_size=4, max_seq_len=64)
    data = encode_dataset(validate_dataset(data_file), build_tokenizer(), "causal_lm", hp.max_seq_len, None)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    profiles = ShapeProfiles(model)
    direct = 0
    for epoch in (1, 2):
        plan = plan_epoch(data, hp, 0, epoch)
        assert plan.batches == plan_epoch(data, hp, 0, epoch).batches  # a pure function: resume replays it
        assert sorted(i for b in plan.batches for i in b) == list(range(len(data)))
        for shape in plan.shapes:
            direct += profile_model(model, *shape).full.total
        assert profiles.full(plan.shapes) == sum(profile_model(model, *s).full.total for s in plan.shapes)
    costs = run_costs(folder, data, "full", hp, 0)
    assert costs.full == costs.flops == direct
    assert costs.steps_per_epoch == -(-len(data) // 4) and costs.examples == len(data)


def test_training_state_round_trips_with_named_keys() -> None:
    state = TrainingState(
        fingerprint="f",
        epoch=2,
        global_step=10,
        optimizer={},
        scheduler={},
        rng={"torch": torch.get_rng_state(), "cuda": None},
        selection=["a"],
        trained=["a", "b"],
        reports=[],
        selection_details={"k": 1},
    )
    again = TrainingState.from_dict(state.to_dict())
    assert again.selection_details == {"k": 1} and again.trained == ["a", "b"]
    older = state.to_dict()
    del older["selection_details"]  # written before details were kept
    assert TrainingState.from_dict(older).selection_details == {}


def test_a_whole_run_flops_budget_becomes_the_estimates_rho(tmp_path) -> None:
    """``max_flops`` given to greencore directly: the run resolves it as the service's estimate does and
    trains within it."""
    from greencore.spec import TrainSpec
    from greencore.train import train

    folder = model_folder("llama", tmp_path / "llama")
    data_file = write_jsonl(tmp_path / "d.jsonl", dataset("messages", 24, seed=4))
    hp = Hyperparameters(n_epochs=2, batch_size=4, max_seq_len=96, learning_rate=1e-3)
    data = encode_dataset(validate_dataset(data_file), build_tokenizer(), "causal_lm", hp.max_seq_len, None)
    costs = run_costs(folder, data, "green", hp, 0)
    assert costs.rho_min < 0.9
    budget = 0.9 * costs.full
    spec = TrainSpec(str(folder), str(data_file), str(tmp_path / "out"))
    spec.hyperparameters = Hyperparameters(**{**hp.as_dict(), "max_flops": budget})
    report = train(spec)
    assert report.rho == pytest.approx(0.9)
    assert sum(e.flops["total"] for e in report.epochs) <= budget
    # rho 0.9 fits a selection every epoch (greencore.reselect's automatic reselect_every): each epoch keeps
    # the budget on its own.
    assert [e.selection["serves_epochs"] for e in report.epochs] == [[1, 1], [2, 2]]
    assert all(e.selection["reselected"] and e.rho_achieved <= 0.9 for e in report.epochs)
