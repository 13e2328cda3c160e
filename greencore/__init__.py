"""GreenTrainer's method as a library: exact FLOPs profile, tensor importance, selection and training."""

from greencore.flops import StepFlops
from greencore.importance import importance_flops, tensor_importance, tentative_optimizer_factory
from greencore.profile import ProfileError, TensorProfile, profile_model
from greencore.select import BudgetTooSmall, Selection, reachable_tensors, select_tensors
from greencore.spec import EnergySettings, EpochReport, Hyperparameters, SpecError, TrainReport, TrainSpec
from greencore.train import train

__all__ = [
    "BudgetTooSmall",
    "EnergySettings",
    "EpochReport",
    "Hyperparameters",
    "ProfileError",
    "Selection",
    "SpecError",
    "StepFlops",
    "TensorProfile",
    "TrainReport",
    "TrainSpec",
    "importance_flops",
    "profile_model",
    "reachable_tensors",
    "select_tensors",
    "tensor_importance",
    "tentative_optimizer_factory",
    "train",
]
