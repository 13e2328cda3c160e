"""Checkpoints: a Hugging Face folder per epoch, written atomically, plus the state to resume from it exactly.

Layout of ``output_dir/epoch-N`` (and of ``output_dir/final``, hard links to the last epoch's files)::

    config.json, generation_config.json     the model's config (labels in id2label/label2id for classifiers)
    model.safetensors                       every tensor, under the base's names and in the base's dtypes;
                                            for LoRA jobs, the adapters merged into the base weights
    tokenizer.json, tokenizer_config.json   the tokenizer, as loaded from the base folder
    adapter/                                LoRA jobs: adapter_config.json + adapter_model.safetensors (peft)
    training_state.pt                       optimizer, scheduler, RNG, selection, epoch, step, reports
    master_weights.safetensors              trained tensors in float32, where the base dtype is narrower

A folder is written under a temporary name (``.epoch-N.tmp-<pid>``), fsync'd, and renamed into place, so a
reader (or a resumed run) sees either the previous checkpoint or the complete new one, never half of one. A
run killed mid-write leaves only such a temporary folder, which nothing lists, serves or resumes from; the
next save in that output folder removes it. A failed write (a full disk) raises CheckpointWriteError and
leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from greencore.durable import fsync_dir

if TYPE_CHECKING:
    from greencore.methods import ModelExport

STATE_FILE = "training_state.pt"
MASTER_FILE = "master_weights.safetensors"
ADAPTER_DIR = "adapter"
FINAL_DIR = "final"


class CheckpointError(ValueError):
    """A resume_from folder that is not a checkpoint of this job."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint folder could not be written (no space left, an I/O error, a failing save); its cause is
    attached. Nothing of the attempt is left: the previous checkpoint, if any, is untouched."""

    def __init__(self, folder: Path, cause: BaseException) -> None:
        super().__init__(f"could not write checkpoint {folder}: {cause}")
        self.folder = folder


def epoch_dir(output_dir: str | Path, epoch: int) -> Path:
    return Path(output_dir) / f"epoch-{epoch}"


def base_dtypes(model_dir: str | Path) -> dict[str, torch.dtype]:
    """The dtype of every tensor in the base folder's safetensors files, by name (empty without
    safetensors)."""
    found: dict[str, torch.dtype] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        if file.name == MASTER_FILE:  # a checkpoint used as a base: its float32 copies are not the model's
            continue
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # safe_open is not a mapping
                found[key] = _DTYPES.get(f.get_slice(key).get_dtype(), torch.float32)
    return found


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _cast_state_dict(
    tensors: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype], default: torch.dtype
) -> dict[str, torch.Tensor]:
    """``tensors`` in the base's dtypes, on the CPU; tensors that share storage (tied weights) stay shared."""
    cast: dict[tuple[int, torch.dtype], torch.Tensor] = {}
    out = {}
    for name, tensor in tensors.items():
        dtype = dtypes.get(name, default if tensor.is_floating_point() else tensor.dtype)
        key = (tensor.data_ptr(), dtype)
        if key not in cast:
            cast[key] = tensor.detach().to("cpu", dtype)
        out[name] = cast[key]
    return out


def _write_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a temporary folder beside ``folder``, fsync what it wrote, and rename it to
    ``folder``.

    Leftovers of a run killed mid-write (``.*.tmp-*``, ``.*.old-*`` beside ``folder``) are removed first: a
    job's output folder is written by one run at a time, so they are never another live run's. A failed write
    removes its temporary folder and raises CheckpointWriteError naming ``folder`` (its cause attached).
    """
    parent = folder.parent
    tmp = parent / f".{folder.name}.tmp-{os.getpid()}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(parent)
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        if folder.exists():  # rewritten after a resume: swap, then drop the old one
            old = parent / f".{folder.name}.old-{os.getpid()}"
            folder.rename(old)
            try:
                tmp.rename(folder)
            except BaseException:
                old.rename(folder)  # the previous checkpoint stays where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
        fsync_dir(parent)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(folder, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(output_dir: str | Path) -> list[Path]:
    """Delete the temporary folders that a killed run left in ``output_dir``; returns what was removed."""
    removed = []
    for path in Path(output_dir).glob(".*"):
        if path.is_dir() and (".tmp-" in path.name or ".old-" in path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder, deepest first: the data is on disk before the
    rename that publishes it (a rename alone can survive a power loss that the data does not)."""
    folders = [folder]
    for path in folder.rglob("*"):
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(path)


def save_checkpoint(
    folder: Path,
    export: ModelExport,
    tokenizer: Any,
    dtypes: dict[str, torch.dtype],
    default_dtype: torch.dtype,
    state: dict[str, Any],
    master_names: Iterable[str] = (),
) -> Path:
    """Write ``folder`` atomically: the model as its method exports it (``Method.export``: a Hugging Face
    model, its tensors under the base's names, anything else it keeps), the tokenizer, the training state.

    ``dtypes``: the base's dtype of each tensor (others get ``default_dtype``). ``master_names``: trained
    tensors whose float32 values are kept beside the narrower saved ones, so that a resume is exact.
    """

    def write(tmp: Path) -> None:
        if export.write_extra is not None:
            export.write_extra(tmp)
        export.hf_model.save_pretrained(
            tmp, state_dict=_cast_state_dict(export.tensors, dtypes, default_dtype)
        )
        tokenizer.save_pretrained(tmp)
        master = {n: export.tensors[n].detach().to("cpu", torch.float32).contiguous() for n in master_names}
        if master:
            save_file(master, str(tmp / MASTER_FILE))
        with open(
            tmp / STATE_FILE, "wb"
        ) as handle:  # through a Python file: a full disk raises OSError(ENOSPC),
            torch.save(state, handle)  # not the errno-less RuntimeError that torch.save(state, path) gives

    _write_atomically(folder, write)
    return folder


def link_final(output_dir: str | Path, source: Path) -> Path:
    """``output_dir/final``: the files of ``source`` (hard links where the filesystem allows, else copies)."""
    folder = Path(output_dir) / FINAL_DIR

    def write(tmp: Path) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)

    _write_atomically(folder, write)
    return folder


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def load_state(folder: str | Path) -> dict[str, Any]:
    """The training state saved in a checkpoint folder."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {STATE_FILE}: not a checkpoint written by greencore.train")
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_master_weights(model: nn.Module, folder: str | Path) -> None:
    """Put back the float32 values of trained tensors saved beside a narrower checkpoint."""
    path = Path(folder) / MASTER_FILE
    if not path.is_file():
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(path)).items():
            params[name].copy_(value)


def restore_adapter(model: nn.Module, folder: str | Path) -> None:
    """Load the LoRA adapter (and saved modules) of a checkpoint into a peft model of the same config."""
    from peft import set_peft_model_state_dict

    weights = load_file(str(Path(folder) / ADAPTER_DIR / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(f"the adapter in {folder} does not fit this model: {unexpected[:3]}")
