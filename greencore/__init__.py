"""GreenTrainer's method as a library: exact FLOPs profile, tensor importance, selection and training."""

from greencore.flops import StepFlops
from greencore.profile import ProfileError, TensorProfile, profile_model

__all__ = ["ProfileError", "StepFlops", "TensorProfile", "profile_model"]
