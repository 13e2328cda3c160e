"""GreenTrainer's method as a library: exact FLOPs profile, tensor importance, selection and training."""

from greencore.flops import StepFlops
from greencore.importance import importance_flops, tensor_importance
from greencore.profile import ProfileError, TensorProfile, profile_model
from greencore.select import BudgetTooSmall, Selection, reachable_tensors, select_tensors

__all__ = [
    "BudgetTooSmall",
    "ProfileError",
    "Selection",
    "StepFlops",
    "TensorProfile",
    "importance_flops",
    "profile_model",
    "reachable_tensors",
    "select_tensors",
    "tensor_importance",
]
