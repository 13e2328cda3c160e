"""A failed job's ``error.message`` names no server path (worker/failures.py): paths under the artifacts and
models folders are shown relative to them, any other absolute path by its last component; the message still
says what went wrong, and the full one goes to the worker's log."""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path

import pytest

from greencore import checkpoint
from greencore.data import DatasetError, validate_dataset
from greencore.models import ModelFolderError, load_config
from worker.failures import error_of, hide_paths

# An absolute path: a slash that starts a word (not the one inside "jobs/ftjob-1", "1/2" or a URL).
ABSOLUTE = re.compile(r"(?<![\w.:/-])/\w")


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """The settings' folders, absolute as Settings makes them, somewhere the user must not learn of."""
    root = tmp_path / "srv" / "greentrainer"
    (root / "artifacts").mkdir(parents=True)
    (root / "models").mkdir()
    return {"artifacts_dir": root / "artifacts", "models_dir": root / "models"}


def public(exc: BaseException, folders: dict[str, Path]) -> tuple[str, str]:
    code, message = error_of(exc, **folders)
    assert not ABSOLUTE.search(message), message
    assert str(folders["artifacts_dir"].parent) not in message
    return code, message


def test_a_failed_checkpoint_write_names_the_checkpoint_relative_to_the_artifacts(
    folders: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    folder = checkpoint.epoch_dir(folders["artifacts_dir"] / "jobs" / "ftjob-abc", 1)

    def no_room(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))

    with pytest.raises(checkpoint.CheckpointWriteError) as failure:
        checkpoint._write_atomically(folder, no_room)
    with caplog.at_level(logging.WARNING, logger="worker.failures"):
        code, message = public(failure.value, folders)
    assert code == "disk_full" and "no space left" in message
    assert "checkpoint jobs/ftjob-abc/epoch-1" in message
    assert str(folder) in caplog.text  # the operator's log has the full message

    def refused(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp / "config.json"))

    with pytest.raises(checkpoint.CheckpointWriteError) as failure:
        checkpoint._write_atomically(folder, refused)
    code, message = public(failure.value, folders)
    assert code == "training_error"
    assert "could not write checkpoint jobs/ftjob-abc/epoch-1" in message and "Permission denied" in message
    assert re.search(r"'jobs/ftjob-abc/\.epoch-1\.tmp-\d+/config\.json'", message), message


def test_a_missing_model_folder_names_the_model(folders: dict[str, Path]) -> None:
    gone = folders["models_dir"] / "llama-gone"
    with pytest.raises(ModelFolderError) as failure:
        load_config(gone)
    code, message = public(failure.value, folders)
    assert code == "invalid_model"
    assert message == "model llama-gone has no config.json: not a Hugging Face model folder"

    cause = OSError(errno.ENOENT, "No such file or directory", str(gone / "model.safetensors"))
    code, message = public(ModelFolderError(f"cannot load {gone} as a causal_lm model: {cause}"), folders)
    assert code == "invalid_model"
    assert message.startswith("cannot load model llama-gone as a causal_lm model: ")
    assert "'model llama-gone/model.safetensors'" in message

    fine_tuned = folders["artifacts_dir"] / "jobs" / "ftjob-abc" / "final"  # a fine-tuned base model
    _, message = public(ModelFolderError(f"{fine_tuned} has no config.json: not a Hugging Face"), folders)
    assert message.startswith("jobs/ftjob-abc/final has no config.json")


def test_a_dataset_error_keeps_its_line_and_loses_its_path(folders: dict[str, Path]) -> None:
    data = folders["artifacts_dir"] / "files" / "tenant-1" / "file-xyz.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n')
    with pytest.raises(DatasetError) as failure:
        validate_dataset(data)
    code, message = public(failure.value, folders)
    assert code == "invalid_dataset" and message == "line 2, field 'prompt': must be a string, not int"

    elsewhere = DatasetError(
        None, None, "cannot read /mnt/shared/corpora/train-2024.jsonl: Input/output error"
    )
    code, message = public(elsewhere, folders)
    assert code == "invalid_dataset"
    assert message == "file: cannot read train-2024.jsonl: Input/output error"

    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", str(data))
    code, message = public(missing, folders)
    assert code == "training_error"
    assert (
        message == "FileNotFoundError: [Errno 2] No such file or directory: 'files/tenant-1/file-xyz.jsonl'"
    )


def test_paths_are_hidden_but_not_urls_fractions_or_relative_names() -> None:
    roots = {"artifacts_dir": Path("/srv/data/artifacts"), "models_dir": Path("/srv/data/artifacts-models")}
    assert hide_paths("wrote /srv/data/artifacts/jobs/j/epoch-1.", **roots) == "wrote jobs/j/epoch-1."
    assert hide_paths("in /srv/data/artifacts-models/m/x", **roots) == "in model m/x"
    assert (
        hide_paths("the root /srv/data/artifacts is full", **roots) == "the root the artifacts folder is full"
    )
    assert hide_paths("see /srv/data/artifactsX/y", **roots) == "see y"  # not under the artifacts folder
    assert hide_paths("ratio 3 / 4, 1/2, jobs/j", **roots) == "ratio 3 / 4, 1/2, jobs/j"
    assert hide_paths("see https://huggingface.co/docs/a", **roots) == "see https://huggingface.co/docs/a"
    assert hide_paths("PosixPath('/home/op/x.bin')", **roots) == "PosixPath('x.bin')"


def test_without_the_folders_the_message_is_the_full_one(tmp_path: Path) -> None:
    exc = ModelFolderError(f"{tmp_path / 'm'} has no config.json")
    assert error_of(exc) == ("invalid_model", str(exc))
