"""Stopping and resuming: a stopped run keeps its last checkpoint; a resumed run equals one never stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from greencore.checkpoint import CheckpointError
from greencore.spec import Hyperparameters, TrainSpec
from greencore.train import train
from tests.model_folders import dataset, model_folder, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {
        "llama": model_folder("llama", root / "llama"),
        "bert": model_folder("bert", root / "bert"),
        "messages": write_jsonl(root / "messages.jsonl", dataset("messages", 64)),
        "text_label": write_jsonl(root / "text_label.jsonl", dataset("text_label", 64)),
        "text_label_valid": write_jsonl(root / "text_label_valid.jsonl", dataset("text_label", 8, seed=1)),
    }


def spec_for(
    setup,
    out: Path,
    method: str,
    kind: str = "llama",
    fmt: str = "messages",
    precision: str = "fp32",
    **kwargs,
) -> TrainSpec:
    hp = Hyperparameters(
        n_epochs=3,
        batch_size=4,
        learning_rate=1e-3,
        max_seq_len=128,
        rho=0.6,
        reselect_every=2,
        warmup_steps=5,
        weight_decay=0.01,
        precision=precision,
    )
    return TrainSpec(
        str(setup[kind]),
        str(setup[fmt]),
        str(out),
        method=method,
        valid_file=str(setup.get(fmt + "_valid")) if fmt + "_valid" in setup else None,
        hyperparameters=hp,
        seed=7,
        **kwargs,
    )


def stop_at(epoch: int, step: int):
    """should_stop and on_step that stop the run before ``step`` of ``epoch``."""
    position = [0, 0]

    def on_step(e: int, s: int, _n: int) -> None:
        position[:] = [e, s]

    def should_stop() -> bool:
        e, s = position
        return (e, s + 1) >= (epoch, step) and e >= 1

    return should_stop, on_step


def comparable(report) -> list[dict]:
    """The parts of the epoch records that do not depend on time or paths."""
    keep = (
        "epoch",
        "selected_tensors",
        "flops",
        "rho_achieved",
        "tokens",
        "train_loss",
        "valid_loss",
        "valid_accuracy",
        "valid_token_accuracy",
        "steps",
        "selection",
    )
    return [{k: e.as_dict()[k] for k in keep} for e in report]


@pytest.mark.parametrize(
    ("method", "kind", "fmt", "precision"),
    [
        ("green", "llama", "messages", "fp32"),
        ("lora", "bert", "text_label", "fp32"),
        ("green", "llama", "messages", "bf16"),  # frozen tensors held in bf16, float32 originals
    ],
)
def test_interrupted_and_resumed_equals_uninterrupted(setup, tmp_path, method, kind, fmt, precision):
    whole = train(spec_for(setup, tmp_path / "whole", method, kind, fmt, precision))
    assert len(whole.epochs) == 3 and not whole.stopped

    should_stop, on_step = stop_at(epoch=2, step=5)
    seen = []
    part = train(
        spec_for(setup, tmp_path / "part", method, kind, fmt, precision),
        on_epoch=seen.append,
        should_stop=should_stop,
        on_step=on_step,
    )
    assert part.stopped and part.final_checkpoint_dir is None
    assert [e.epoch for e in part.epochs] == [1] and seen == part.epochs
    out = tmp_path / "part"
    assert sorted(p.name for p in out.iterdir()) == ["epoch-1"]  # no half-written epoch 2, no final
    before = (out / "epoch-1" / "model.safetensors").read_bytes()

    resumed = train(
        spec_for(setup, tmp_path / "part", method, kind, fmt, precision, resume_from=str(out / "epoch-1"))
    )
    assert not resumed.stopped
    assert comparable(resumed.epochs) == comparable(whole.epochs)
    assert (out / "epoch-1" / "model.safetensors").read_bytes() == before
    for name in ("epoch-2", "epoch-3", "final"):
        a = load_file(str(tmp_path / "whole" / name / "model.safetensors"))
        b = load_file(str(out / name / "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    if method == "lora":
        a = load_file(str(tmp_path / "whole" / "final" / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(out / "final" / "adapter" / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_stop_before_the_first_step_writes_nothing(setup, tmp_path):
    report = train(spec_for(setup, tmp_path / "o", "full"), should_stop=lambda: True)
    assert report.stopped and report.epochs == [] and report.final_checkpoint_dir is None
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_stop_is_checked_every_step(setup, tmp_path):
    calls = []
    should_stop, on_step = stop_at(epoch=1, step=3)

    def counted() -> bool:
        calls.append(1)
        return should_stop()

    steps = []
    report = train(
        spec_for(setup, tmp_path / "o", "full"),
        should_stop=counted,
        on_step=lambda *a: (steps.append(a), on_step(*a)),
    )
    assert report.stopped and report.epochs == []
    assert [s for _, s, _ in steps] == [1, 2]  # stopped before the third step ran


def test_resume_refuses_a_checkpoint_of_another_job(setup, tmp_path):
    spec = spec_for(setup, tmp_path / "o", "full")
    spec.hyperparameters.n_epochs = 1
    train(spec)
    other = spec_for(setup, tmp_path / "p", "full", resume_from=str(tmp_path / "o" / "epoch-1"))
    other.hyperparameters.learning_rate = 2e-3
    with pytest.raises(CheckpointError, match="different job"):
        train(other)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        train(spec_for(setup, tmp_path / "p", "full", resume_from=str(setup["llama"])))
