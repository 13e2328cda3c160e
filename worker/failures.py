"""A training run's exception as the job's ``error: {code, message}``."""

from __future__ import annotations

import errno


def error_of(exc: BaseException) -> tuple[str, str]:
    """(code, message) for an exception raised by greencore.train or around it."""
    import torch

    from greencore.checkpoint import CheckpointError
    from greencore.data import DatasetError
    from greencore.methods import MethodError
    from greencore.models import ModelFolderError
    from greencore.select import BudgetTooSmall
    from greencore.spec import SpecError

    codes: list[tuple[type[BaseException], str]] = [
        (DatasetError, "invalid_dataset"),
        (ModelFolderError, "invalid_model"),
        (SpecError, "invalid_hyperparameters"),
        (BudgetTooSmall, "budget_too_small"),
        (MethodError, "method_error"),
        (CheckpointError, "invalid_checkpoint"),
        (torch.OutOfMemoryError, "out_of_memory"),
    ]
    for cls, code in codes:
        if isinstance(exc, cls):
            return code, str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "disk_full", f"no space left on the device: {exc}"
    return "training_error", f"{type(exc).__name__}: {exc}"
