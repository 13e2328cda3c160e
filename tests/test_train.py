"""greencore.train on tiny models: every method and data format, the records, the budget, the checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from greencore.data import DatasetError
from greencore.methods import transformer_layers
from greencore.select import BudgetTooSmall
from greencore.spec import EpochReport, Hyperparameters, SpecError, TrainSpec
from greencore.train import train

FLOP_KEYS = {"fwd", "bwd_act", "bwd_weight", "selection", "total", "full", "predicted_step", "measured_step"}


pytestmark = pytest.mark.usefixtures("one_thread")


def run(folders, data, tmp_path, kind, fmt, method, n_epochs=2, **hp):
    spec = TrainSpec(
        model_dir=str(folders[kind]),
        train_file=str(data[fmt]),
        valid_file=str(data[fmt + "_valid"]),
        output_dir=str(tmp_path / "out"),
        method=method,
        hyperparameters=Hyperparameters(
            **{"n_epochs": n_epochs, "batch_size": 4, "learning_rate": 1e-3, "max_seq_len": 96, **hp}
        ),
    )
    seen: list[EpochReport] = []
    steps: list[tuple[int, int, int]] = []
    report = train(spec, on_epoch=seen.append, on_step=lambda *a: steps.append(a))
    return spec, report, seen, steps


def check_records(report, seen, steps, rho=None):
    """What every method's records must satisfy."""
    assert seen == report.epochs and [e.epoch for e in seen] == list(range(1, len(seen) + 1))
    for e in report.epochs:
        f = e.flops
        assert set(f) == FLOP_KEYS
        assert f["total"] == f["fwd"] + f["bwd_act"] + f["bwd_weight"] + f["selection"]
        assert e.rho_achieved == pytest.approx(f["total"] / f["full"])
        assert f["measured_step"] == pytest.approx(f["predicted_step"], rel=0.01) and f["measured_step"] > 0
        if rho is not None:
            assert f["total"] <= rho * f["full"]
        assert e.selected_tensors and e.steps == steps[0][2] and e.tokens > 0
        assert e.train_loss > 0 and e.valid_loss > 0 and e.wall_s > 0
        assert e.energy_method in ("rapl", "estimate", "nvml") and e.energy_j > 0 and e.gco2e > 0
        assert Path(e.checkpoint_dir).name == f"epoch-{e.epoch}"
        json.dumps(e.as_dict())  # plain values, storable as JSON
    n = steps[0][2]  # 64 examples in batches of 4, less those whose completion max_seq_len cut away
    assert 12 <= n <= 16 and n == -(-(64 - report.epochs[0].dropped_examples) // 4)
    assert steps == [(e, s, n) for e in range(1, len(seen) + 1) for s in range(1, n + 1)]


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_green_respects_budget_and_leaves_untrained_tensors_bit_identical(folders, data, tmp_path):
    spec, report, seen, steps = run(
        folders, data, tmp_path, "llama", "messages", "green", n_epochs=3, rho=0.6
    )
    check_records(report, seen, steps, rho=0.6)
    assert (report.method, report.task, report.rho, report.stopped) == ("green", "causal_lm", 0.6, False)
    for e in report.epochs:
        assert e.flops["selection"] > 0 and e.selection["reselected"]
        assert e.flops["full"] > e.flops["total"] > e.flops["fwd"]
        assert e.valid_token_accuracy is not None and e.valid_accuracy is None
    trained = {n for e in report.epochs for n in e.selected_tensors}
    base, final = saved_tensors(folders["llama"]), saved_tensors(Path(report.final_checkpoint_dir))
    assert set(final) == set(base)
    untouched = set(base) - trained
    assert untouched and trained - set(base) == set()
    for name, tensor in base.items():
        assert final[name].dtype == tensor.dtype
        if name in untouched:
            assert torch.equal(final[name], tensor), name
    assert any(not torch.equal(final[n], base[n]) for n in trained)
    # The final checkpoint is the last epoch's, with its tokenizer; every epoch has its own.
    out = Path(spec.output_dir)
    assert sorted(p.name for p in out.iterdir()) == ["epoch-1", "epoch-2", "epoch-3", "final"]
    assert (out / "final" / "tokenizer.json").is_file()
    assert (out / "final" / "model.safetensors").read_bytes() == (
        out / "epoch-3" / "model.safetensors"
    ).read_bytes()


def test_green_reselect_every_reuses_the_selection(folders, data, tmp_path):
    _, report, seen, steps = run(
        folders, data, tmp_path, "llama", "messages", "green", n_epochs=2, rho=0.6, reselect_every=2
    )
    check_records(report, seen, steps, rho=0.6)
    first, second = report.epochs
    assert first.selection["reselected"] and not second.selection["reselected"]
    assert second.flops["selection"] == 0 and second.selected_tensors == first.selected_tensors


def test_green_trains_nothing_when_no_tensor_has_positive_importance(folders, data, tmp_path, monkeypatch):
    # A tentative step that overshoots (a large learning rate late in training) can leave every candidate with
    # importance <= 0: the selection is then empty and the epoch trains nothing, paying only its selection.
    import greencore.methods
    from greencore.importance import ImportancePass

    def all_negative(model, batches, factory, names=None, **kwargs):
        return ImportancePass(dict.fromkeys(names, -1.0), 1.0)

    monkeypatch.setattr(greencore.methods, "importance_pass", all_negative)
    _, report, seen, steps = run(folders, data, tmp_path, "llama", "messages", "green", n_epochs=2, rho=0.6)
    assert seen == report.epochs and len(seen) == 2 and not report.stopped
    for e in report.epochs:
        assert e.selected_tensors == [] and e.steps == 0 and e.train_loss is None
        assert e.flops["selection"] > 0 and e.flops["total"] == e.flops["selection"]
        assert e.flops["fwd"] == e.flops["bwd_act"] == e.flops["bwd_weight"] == 0
        assert e.flops["total"] <= 0.6 * e.flops["full"] and e.valid_loss > 0
    base, final = saved_tensors(folders["llama"]), saved_tensors(Path(report.final_checkpoint_dir))
    assert all(torch.equal(final[n], t) for n, t in base.items())


def test_green_importance_steps_a_copy_of_the_training_optimizer(folders, data, tmp_path, monkeypatch):
    # The tentative step is the step training would take next (the paper's code steps its training optimizer):
    # the scheduled learning rate and the Adam moments of the tensors trained so far, not a fresh AdamW at the
    # peak.
    import greencore.methods

    real = greencore.methods.importance_pass
    seen_steps: list[tuple[float, int]] = []

    def spy(model, batches, factory, names=None, **kwargs):
        params = dict(model.named_parameters())
        tentative = factory([params[n] for n in names])
        seen_steps.append((tentative.param_groups[0]["lr"], len(tentative.state)))
        return real(model, batches, factory, names=names, **kwargs)

    monkeypatch.setattr(greencore.methods, "importance_pass", spy)
    _, report, seen, steps = run(
        folders,
        data,
        tmp_path,
        "llama",
        "messages",
        "green",
        n_epochs=2,
        rho=0.6,
        learning_rate=1e-3,
        warmup_steps=0,
    )
    check_records(report, seen, steps, rho=0.6)
    n = report.epochs[0].steps
    (lr1, state1), (lr2, state2) = seen_steps
    assert lr1 == pytest.approx(1e-3) and state1 == 0
    assert lr2 == pytest.approx(1e-3 * (2 * n - n) / (2 * n)) and state2 > 0  # linear decay, halfway


def test_green_takes_the_first_step_from_the_importance_pass(folders, data, tmp_path, monkeypatch):
    # The importance pass's first gradients (at the current weights, on the epoch's first batch) are what a
    # training step on that batch computes for the chosen tensors: the trainer applies them as the epoch's
    # first step and its loop runs the other batches, so the budget pays one step less. The tiny Llama has no
    # dropout, so eval and train mode compute the same loss.
    import copy

    import greencore.methods

    real = greencore.methods.importance_pass
    before: list[tuple[torch.nn.Module, dict]] = []  # (model before the pass, its batch), per selecting epoch

    model_of: list[torch.nn.Module] = []  # the model in training

    def spy(model, batches, factory, names=None, **kwargs):
        model_of.append(model)
        before.append((copy.deepcopy(model), batches[0]))
        return real(model, batches, factory, names=names, **kwargs)

    after_first: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(greencore.methods, "importance_pass", spy)

    def on_step(epoch, step, total):
        steps.append((epoch, step, total))
        if (epoch, step) == (1, 1):  # called once the first step is applied, before the loop's first batch
            after_first.append({n: p.detach().clone() for n, p in model_of[-1].named_parameters()})

    steps: list[tuple[int, int, int]] = []
    spec = TrainSpec(
        str(folders["llama"]),
        str(data["messages"]),
        str(tmp_path / "out"),
        method="green",
        valid_file=str(data["messages_valid"]),
        hyperparameters=Hyperparameters(
            n_epochs=2, batch_size=4, learning_rate=1e-3, max_seq_len=96, rho=0.6, max_grad_norm=0.5
        ),
    )
    seen: list[EpochReport] = []
    report = train(spec, on_epoch=seen.append, on_step=on_step)
    check_records(report, seen, steps, rho=0.6)
    _, full, _, _ = run(folders, data, tmp_path / "full", "llama", "messages", "full")

    # The first step: the chosen tensors' gradient on the first batch, clipped, through AdamW at the scheduled
    # lr.
    chosen = report.epochs[0].selected_tensors
    ref, batch = before[0]
    for n, p in ref.named_parameters():
        p.requires_grad_(n in chosen)
    ref(**batch).loss.backward()
    trained = [p for n, p in ref.named_parameters() if n in chosen]
    torch.nn.utils.clip_grad_norm_(trained, 0.5)
    torch.optim.AdamW(trained, lr=1e-3, weight_decay=0.0).step()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(after_first[0][n], p.detach(), msg=n)
        if n not in chosen:
            assert torch.equal(after_first[0][n], p.detach()), n

    # Accounting: the loop ran every batch but the first; the first is paid by the importance passes.
    for green, whole in zip(report.epochs, full.epochs, strict=True):
        assert green.steps == whole.steps and green.tokens == whole.tokens
        assert 0 < green.flops["fwd"] < whole.flops["fwd"]
        assert green.flops["full"] == whole.flops["full"]
        first_fwd = whole.flops["fwd"] - green.flops["fwd"]  # the forward of the epoch's first batch
        assert first_fwd < whole.flops["fwd"] / (whole.steps - 1)  # ... at most one batch's share


def test_full_spends_full(folders, data, tmp_path):
    _, report, seen, steps = run(folders, data, tmp_path, "gpt2", "prompt_completion", "full")
    check_records(report, seen, steps)
    for e in report.epochs:
        assert e.flops["total"] == e.flops["full"] and e.rho_achieved == 1.0 and e.flops["selection"] == 0
    assert report.rho is None


def test_topk_trains_top_layers_and_head(folders, data, tmp_path):
    _, report, seen, steps = run(folders, data, tmp_path, "t5", "prompt_completion", "topk", topk_layers=1)
    check_records(report, seen, steps)
    selected = set(report.epochs[0].selected_tensors)
    from transformers import AutoModelForSeq2SeqLM

    layers = transformer_layers(AutoModelForSeq2SeqLM.from_pretrained(folders["t5"]))
    assert len(layers) == 4  # 2 encoder blocks, then 2 decoder blocks
    assert set(layers[-1]) <= selected
    assert not selected & set(layers[0] + layers[1] + layers[2])
    assert "decoder.final_layer_norm.weight" in selected  # the head: what follows the last layer
    assert report.epochs[0].selection["k"] == 1


def test_topk_largest_k_within_rho(folders, data, tmp_path):
    _, report, seen, steps = run(folders, data, tmp_path, "bert", "text_label", "topk", n_epochs=1, rho=0.7)
    check_records(report, seen, steps, rho=0.7)
    k = report.epochs[0].selection["k"]
    assert 0 < k < 2 and report.epochs[0].rho_achieved <= 0.7


def test_lora_trains_adapters_and_saves_adapter_and_merged_model(folders, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, report, seen, steps = run(folders, data, tmp_path, "gpt2", "messages", "lora", lora_r=4)
    check_records(report, seen, steps)
    selected = report.epochs[0].selected_tensors
    assert selected and all("lora_" in n for n in selected)
    assert all(".attn." in n for n in selected)  # the attention projections only, found from the model
    final = Path(report.final_checkpoint_dir)
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 16)
    # The merged model (plain transformers) and base + adapter (peft) compute the same thing.
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    base = AutoModelForCausalLM.from_pretrained(folders["gpt2"])
    adapted = PeftModel.from_pretrained(base, final / "adapter").eval()
    ids = torch.randint(3, 300, (2, 12))
    untrained = AutoModelForCausalLM.from_pretrained(folders["gpt2"]).eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, untrained(ids).logits, atol=1e-5)
    base_tensors, saved = saved_tensors(folders["gpt2"]), saved_tensors(final)
    assert set(saved) == set(base_tensors)
    changed = {n for n in base_tensors if not torch.equal(saved[n], base_tensors[n])}
    assert changed and all(".attn." in n for n in changed)


def test_classification_on_bert_sizes_head_and_saves_labels(folders, data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    _, report, seen, steps = run(folders, data, tmp_path, "bert", "text_label", "green", rho=0.5)
    check_records(report, seen, steps, rho=0.5)
    assert report.task == "classification" and report.labels == ["long", "medium", "short"]
    assert all(e.valid_accuracy is not None and e.valid_token_accuracy is None for e in report.epochs)
    model = AutoModelForSequenceClassification.from_pretrained(report.final_checkpoint_dir)
    assert model.config.id2label == {0: "long", 1: "medium", 2: "short"}
    assert model.classifier.out_features == 3


def test_lora_on_classification_trains_the_new_head(folders, data, tmp_path):
    _, report, seen, steps = run(folders, data, tmp_path, "bert", "text_label", "lora", n_epochs=1)
    check_records(report, seen, steps)
    selected = report.epochs[0].selected_tensors
    assert any("classifier" in n for n in selected) and any("lora_" in n for n in selected)


@pytest.mark.parametrize(("kind", "fmt"), [("t5", "messages"), ("llama", "prompt_completion")])
def test_other_formats_train(folders, data, tmp_path, kind, fmt):
    _, report, seen, steps = run(folders, data, tmp_path, kind, fmt, "green", n_epochs=1, rho=0.7)
    check_records(report, seen, steps, rho=0.7)
    assert report.task == ("seq2seq" if kind == "t5" else "causal_lm")


def test_truncation_is_counted(folders, data, tmp_path):
    _, report, _, _ = run(
        folders, data, tmp_path, "gpt2", "prompt_completion", "full", n_epochs=1, max_seq_len=40
    )
    e = report.epochs[0]
    assert e.truncated_examples > 0
    assert e.tokens <= 40 * 64


def test_bad_input_is_refused_before_training(folders, data, tmp_path):
    with pytest.raises(BudgetTooSmall) as err:
        run(folders, data, tmp_path, "llama", "messages", "green", rho=0.3)
    assert err.value.rho_min > 0.3 and "rho_min" in str(err.value)
    with pytest.raises(SpecError, match="method"):
        run(folders, data, tmp_path, "llama", "messages", "sparse")
    with pytest.raises(SpecError, match="rho"):
        run(folders, data, tmp_path, "llama", "messages", "green", rho=1.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    spec = TrainSpec(str(folders["llama"]), str(bad), str(tmp_path / "o"))
    with pytest.raises(DatasetError) as derr:
        train(spec)
    assert (derr.value.line, derr.value.field) == (2, "completion")
    assert not (tmp_path / "o").exists()


def test_checkpoint_keeps_the_base_dtype(folders, data, tmp_path):
    """A bf16 base trains in float32 and is saved in bf16; trained tensors keep float32 masters for resume."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(folders["llama"], dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(folders["llama"]).save_pretrained(base)
    folders = {**folders, "bf16": base}
    _, report, _, _ = run(folders, data, tmp_path, "bf16", "messages", "green", n_epochs=1, rho=0.6)
    final = Path(report.final_checkpoint_dir)
    before, after = saved_tensors(base), saved_tensors(final)
    assert {n: t.dtype for n, t in after.items()} == {n: t.dtype for n, t in before.items()}
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    trained = set(report.epochs[0].selected_tensors)
    with safe_open(str(final / "master_weights.safetensors"), "pt") as f:
        assert set(f.keys()) == trained
    assert all(torch.equal(after[n], before[n]) for n in set(before) - trained)


def small_run(folders, tmp_path, **hp):
    """Green on 24 examples at batch 8 (3 steps an epoch) at rho 0.5, 3 epochs."""
    from tests.model_folders import dataset, write_jsonl

    train_file = write_jsonl(tmp_path / "small.jsonl", dataset("messages", 24, seed=0))
    spec = TrainSpec(
        model_dir=str(folders["llama"]),
        train_file=str(train_file),
        output_dir=str(tmp_path / "out"),
        method="green",
        hyperparameters=Hyperparameters(
            **{"n_epochs": 3, "batch_size": 8, "learning_rate": 1e-3, "max_seq_len": 96, "rho": 0.5, **hp}
        ),
    )
    return spec, train(spec)


def test_green_trains_a_small_dataset_selecting_once_within_the_whole_runs_budget(folders, tmp_path):
    # Per epoch, an importance pass and the cheapest tensor cost more than rho 0.5 of its 3 steps; the
    # automatic reselect_every spreads one pass over the run's 9 steps, and the run keeps rho as a whole.
    _, report = small_run(folders, tmp_path)
    epochs = report.epochs
    assert [e.selection["reselected"] for e in epochs] == [True, False, False]
    assert all(e.selection["serves_epochs"] == [1, 3] for e in epochs)
    assert all(e.steps == 3 and e.selected_tensors == epochs[0].selected_tensors for e in epochs)
    total, full = sum(e.flops["total"] for e in epochs), sum(e.flops["full"] for e in epochs)
    assert total <= 0.5 * full and epochs[0].flops["selection"] > 0
    assert [e.flops["selection"] for e in epochs[1:]] == [0, 0]
    assert epochs[0].rho_achieved > 0.5  # the selecting epoch pays the pass; the others make up for it
    for e in epochs:
        assert e.flops["measured_step"] == e.flops["predicted_step"] > 0 and e.train_loss > 0


def test_green_on_part_of_each_batch_selects_every_epoch_within_its_budget(folders, tmp_path):
    _, report = small_run(folders, tmp_path, reselect_every=1, importance_rows=2)
    for e in report.epochs:
        assert e.selection["reselected"] and e.selection["serves_epochs"] == [e.epoch, e.epoch]
        assert e.flops["total"] <= 0.5 * e.flops["full"] and e.selected_tensors
        assert e.steps == 3  # the loop trains every batch: a part of one is not its step
        assert e.flops["selection"] < e.flops["full"] / 3 / 2  # two passes on 2 of 8 rows


def test_green_refuses_a_small_dataset_naming_what_fits_before_training(folders, tmp_path):
    with pytest.raises(BudgetTooSmall) as err:
        small_run(folders, tmp_path, reselect_every=1)
    assert err.value.rho_min > 0.5
    assert [a.split("=")[0] for a in err.value.advice[:3]] == [
        "reselect_every",
        "importance_rows",
        "batch_size",
    ]
    assert "it would fit at rho=0.5 with reselect_every=3 (rho_min 0.4" in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything trained
