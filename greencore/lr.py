"""The automatic learning rate (``learning_rate: "auto"``, the default): what a run of a method takes when the
job names none.

A method that trains fewer tensors wants a larger step. AdamW moves every trained weight by about the learning
rate whatever its gradient's size, so the change of the network's function in a step grows with how much of it
trains: training a tenth of the network at the full fine-tuning rate changes it about a tenth as much. The
rule is therefore two factors:

``learning_rate = full_learning_rate(model, batch) x method scale``

- ``full_learning_rate``: full fine-tuning's rate, ``BASE_LEARNING_RATE`` for a model of ``BASE_PARAMS``
  non-embedding parameters at ``BASE_BATCH`` sequences a step, times ``(params / BASE_PARAMS) ** -1/3`` and
  ``(batch / BASE_BATCH) ** 1/2`` (Adam's square-root rule for the batch).
- The method's scale (``Method.learning_rate_scale``): 1 for full fine-tuning; for the methods that train part
  of the backward pass within a FLOPs share (green at its rho, top-k at its planned layers' FLOPs share, which
  may be well below its budget), ``backward_share ** -5/3``
  where ``backward_share = (share - forward_share) / (1 - forward_share)`` is the share of the backward pass
  bought, capped at ``MAX_SCALE``; LoRA's ``LORA_SCALE``.

docs/training.md gives the measurements the constants come from (bench/results/methods*.md's learning-rate
grids) and how close the rule comes to each method's best grid rate on each bench task.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

BASE_LEARNING_RATE = 1e-4  # full fine-tuning's best grid rate: all-MiniLM-L6-v2, both bench classifications
BASE_PARAMS = 10_796_932  # all-MiniLM-L6-v2's non-embedding parameters (its head of 4 classes included)
BASE_BATCH = 16  # the bench tasks' batch
SIZE_EXPONENT = -1 / 3  # larger models take smaller rates (7-8B: about 1e-5 at batch 16)
BATCH_EXPONENT = 1 / 2  # Adam's square-root scaling of the rate with the batch
BACKWARD_EXPONENT = -5 / 3  # green and top-k: scale = backward_share ** this (x10 at rho 0.5, x3 at 0.7)
MAX_SCALE = 30.0  # the largest scale a budget gets (at rho near rho_min the share bought tends to 0)
LORA_SCALE = 30.0  # LoRA's rate over full fine-tuning's (its best grid rate was 10-30x full's)


@dataclass(frozen=True)
class LearningRateBasis:
    """What the automatic rate is computed from: the model's size, the run's batch and its FLOPs split."""

    non_embedding_params: int  # parameters outside nn.Embedding tables (a classification head included)
    batch_size: int  # sequences per optimizer step
    forward_share: float  # the forward pass's share of a full fine-tuning step's FLOPs (about 1/3)


@dataclass(frozen=True)
class AutoLearningRate:
    """The automatic rate of a run: ``learning_rate = full x scale``."""

    learning_rate: float
    full: float  # full fine-tuning's rate for this model and batch
    scale: float  # the method's factor (Method.learning_rate_scale)


def non_embedding_params(model: nn.Module) -> int:
    """Parameters of ``model`` outside its ``nn.Embedding`` tables (a weight tied to one is an embedding)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in tables)


def full_learning_rate(basis: LearningRateBasis) -> float:
    """Full fine-tuning's automatic rate for ``basis``'s model and batch."""
    size = (basis.non_embedding_params / BASE_PARAMS) ** SIZE_EXPONENT
    batch = (basis.batch_size / BASE_BATCH) ** BATCH_EXPONENT
    return BASE_LEARNING_RATE * size * batch


def budget_scale(flops_share: float, forward_share: float) -> float:
    """The scale of a method that trains within ``flops_share`` of full fine-tuning's FLOPs: the share of the
    backward pass it buys, to the power ``BACKWARD_EXPONENT``, at most ``MAX_SCALE``."""
    bought = (min(flops_share, 1.0) - forward_share) / (1.0 - forward_share)
    if bought <= 0:
        return MAX_SCALE
    return min(MAX_SCALE, bought**BACKWARD_EXPONENT)


def auto_learning_rate(basis: LearningRateBasis, scale: float) -> AutoLearningRate:
    """The automatic rate of a method whose scale is ``scale`` (``Method.learning_rate_scale``)."""
    full = full_learning_rate(basis)
    return AutoLearningRate(full * scale, full, scale)
