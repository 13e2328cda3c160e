"""Training errors a job can meet, raised for real, and the ``error: {code, message}`` the worker gives them
(worker/failures.py): a diverging loss, a corrupt model folder, the host out of memory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from greencore.models import ModelFolderError
from greencore.spec import Hyperparameters, TrainSpec
from greencore.train import LossNotFinite, train
from tests.model_folders import dataset, model_folder, write_jsonl
from worker.failures import error_of

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_folder("llama", tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_jsonl(
        tmp_path_factory.mktemp("data") / "train.jsonl", dataset("prompt_completion", 32, seed=0)
    )


def spec(model_dir: Path, train_file: str, out: Path, **hp: object) -> TrainSpec:
    return TrainSpec(
        str(model_dir),
        train_file,
        str(out),
        method="full",
        hyperparameters=Hyperparameters(**{"n_epochs": 2, "batch_size": 4, "max_seq_len": 64, **hp}),
    )


def test_a_diverging_loss_stops_the_run_before_it_saves_garbage(
    llama: Path, train_file: str, tmp_path: Path
) -> None:
    seen = []
    with pytest.raises(LossNotFinite) as err:
        train(
            spec(llama, train_file, tmp_path / "out", learning_rate=1e30, max_grad_norm=None),
            on_epoch=seen.append,
        )
    assert not seen  # no epoch reported, and so no checkpoint of NaN weights
    assert not list((tmp_path / "out").glob("epoch-*"))
    code, message = error_of(err.value)
    assert code == "loss_not_finite" and "epoch 1" in message and "learning_rate" in message


def test_a_corrupt_model_folder_is_invalid_model(llama: Path, train_file: str, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(llama, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    with pytest.raises(ModelFolderError) as err:
        train(spec(corrupt, train_file, tmp_path / "out"))
    code, message = error_of(err.value)
    assert code == "invalid_model" and str(corrupt) in message


def test_host_out_of_memory_is_out_of_memory() -> None:
    with pytest.raises(RuntimeError) as err:
        torch.empty(1 << 50, dtype=torch.uint8)  # a petabyte: torch's CPU allocator refuses it
    code, message = error_of(err.value)
    assert code == "out_of_memory" and "batch_size" in message
