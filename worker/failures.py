"""A training run's exception as the job's ``error: {code, message}``."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do their own I/O report it: the C library's text (in C++ and Rust messages too) and
# Rust's io::Error suffix, e.g. safetensors' "I/O error: No space left on device (os error 28)".
DISK_FULL_TEXT = re.compile(
    rf"no space left on device|disk quota exceeded|\(os error ({errno.ENOSPC}|{errno.EDQUOT})\)",
    re.IGNORECASE,
)
CPU_OOM_TEXT = re.compile(r"DefaultCPUAllocator: (can't allocate memory|not enough memory)")


def error_of(exc: BaseException) -> tuple[str, str]:
    """(code, message) for an exception raised by greencore.train or around it.

    A full disk is found anywhere in the exception's chain (``__cause__``, ``__context__``): torch and
    safetensors wrap ENOSPC in their own exception types.
    """
    import torch

    from greencore.checkpoint import CheckpointError
    from greencore.data import DatasetError
    from greencore.methods import MethodError
    from greencore.models import ModelFolderError
    from greencore.select import BudgetTooSmall
    from greencore.spec import SpecError
    from greencore.train import LossNotFinite

    codes: list[tuple[type[BaseException], str]] = [
        (DatasetError, "invalid_dataset"),
        (ModelFolderError, "invalid_model"),
        (SpecError, "invalid_hyperparameters"),
        (BudgetTooSmall, "budget_too_small"),
        (MethodError, "method_error"),
        (CheckpointError, "invalid_checkpoint"),
        (torch.OutOfMemoryError, "out_of_memory"),
        (LossNotFinite, "loss_not_finite"),
    ]
    for cls, code in codes:
        if isinstance(exc, cls):
            return code, str(exc)
    full = disk_full_message(exc)
    if full is not None:
        return "disk_full", full
    if any(CPU_OOM_TEXT.search(str(e)) for e in causes(exc)):  # torch's CPU allocator raises a RuntimeError
        return "out_of_memory", f"out of host memory: {exc}; use a smaller batch_size or max_seq_len"
    return "training_error", f"{type(exc).__name__}: {exc}"


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception in its chain (``__cause__`` and ``__context__``), outermost first, once
    each."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def disk_full_message(exc: BaseException) -> str | None:
    """A message saying that no space was left and where (the checkpoint folder, or the file), when ``exc``'s
    chain holds an ENOSPC or EDQUOT (as an OSError, or in a library's message); else None."""
    from greencore.checkpoint import CheckpointWriteError

    chain = list(causes(exc))
    full = next((e for e in chain if _is_disk_full(e)), None)
    if full is None:
        return None
    where = next((f"checkpoint {e.folder}" for e in chain if isinstance(e, CheckpointWriteError)), None)
    where = where or next((str(e.filename) for e in chain if isinstance(e, OSError) and e.filename), None)
    where = where or "the job's output folder"
    what = (
        "disk quota exceeded" if isinstance(full, OSError) and full.errno == errno.EDQUOT else "no space left"
    )
    return (
        f"{what} on the device while writing {where}: free space on that volume, then submit the job again "
        f"({full})"
    )


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in DISK_FULL_ERRNOS
    return DISK_FULL_TEXT.search(str(exc)) is not None
