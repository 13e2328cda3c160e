"""GreenTrainer's method as a library: exact FLOPs profile, tensor importance, selection and training.

The names below are imported on first use, so that ``import greencore.spec`` or ``greencore.registry`` (plain
dataclasses, what the service's settings and schemas need) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BudgetTooSmall": "greencore.select",
    "EnergySettings": "greencore.spec",
    "EpochReport": "greencore.spec",
    "Hyperparameters": "greencore.spec",
    "ProfileError": "greencore.profile",
    "Selection": "greencore.select",
    "SpecError": "greencore.spec",
    "StepFlops": "greencore.flops",
    "TensorProfile": "greencore.profile",
    "TrainReport": "greencore.spec",
    "TrainSpec": "greencore.spec",
    "importance_flops": "greencore.importance",
    "profile_model": "greencore.profile",
    "reachable_tensors": "greencore.select",
    "run_costs": "greencore.estimate",
    "select_tensors": "greencore.select",
    "tensor_importance": "greencore.importance",
    "tentative_optimizer_factory": "greencore.importance",
    "train": "greencore.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'greencore' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # importing greencore.train bound the submodule to this name: the function wins
    return value
