"""The automatic learning rate (``learning_rate: "auto"``, the default): what a run of a method takes when the
job names none.

A method that trains fewer tensors wants a larger step. AdamW moves every trained weight by about the learning
rate whatever its gradient's size, so the change of the network's function in a step grows with how much of it
trains: training a tenth of the network at the full fine-tuning rate changes it about a tenth as much. The
rule is therefore two factors:

``learning_rate = reference_learning_rate(model, batch) x method factor``

- ``reference_learning_rate``: ``BASE_LEARNING_RATE`` for a model of ``BASE_PARAMS`` non-embedding parameters
  at ``BASE_BATCH`` sequences a step, times ``(params / BASE_PARAMS) ** -1/3`` and ``(batch / BASE_BATCH) **
  1/2`` (Adam's square-root rule for the batch).
- The method's factor (``Method.learning_rate_scale``): ``FULL_SCALE`` for full fine-tuning; for the methods
  that train part of the backward pass within a FLOPs share (green at its rho, top-k at its planned layers'
  FLOPs share, which may be well below its budget), ``backward_share ** -5/3``
  where ``backward_share = (share - forward_share) / (1 - forward_share)`` is the share of the backward pass
  bought, between ``FULL_SCALE`` and ``MAX_SCALE``; LoRA's ``LORA_SCALE``.

What a run reports (``AutoLearningRate``) is its rate, full fine-tuning's rate for the same model and batch,
and the ratio of the two.

docs/training.md gives the measurements the constants come from (bench/results/methods*.md's learning-rate
grids) and how close the rule comes to each method's best grid rate on each bench task.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# The reference the factors multiply: all-MiniLM-L6-v2's best full fine-tuning grid rate on parts of speech
# and noun topics (3e-4 on verb topics and on more noun topics).
BASE_LEARNING_RATE = 1e-4
BASE_PARAMS = 10_796_932  # all-MiniLM-L6-v2's non-embedding parameters (its head of 4 classes included)
BASE_BATCH = 16  # the bench tasks' batch
SIZE_EXPONENT = -1 / 3  # larger models take smaller rates (7-8B: reference about 1.2e-5 at batch 16)
BATCH_EXPONENT = 1 / 2  # Adam's square-root scaling of the rate with the batch
BACKWARD_EXPONENT = -5 / 3  # green and top-k: factor = backward_share ** this (x10 at rho 0.5, x3 at 0.7)
MAX_SCALE = 30.0  # the largest factor a budget gets (at rho near rho_min the share bought tends to 0)
LORA_SCALE = 30.0  # LoRA's factor (its best grid rate was 10-30x the reference)
FULL_SCALE = 1.7  # full fine-tuning's factor: within 1 point of its grid's best on the MiniLM tasks


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
    scale: float  # learning_rate / full


def non_embedding_params(model: nn.Module) -> int:
    """Parameters of ``model`` outside its ``nn.Embedding`` tables (a weight tied to one is an embedding)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in tables)


def reference_learning_rate(basis: LearningRateBasis) -> float:
    """The rate the methods' factors multiply for ``basis``'s model and batch."""
    size = (basis.non_embedding_params / BASE_PARAMS) ** SIZE_EXPONENT
    batch = (basis.batch_size / BASE_BATCH) ** BATCH_EXPONENT
    return BASE_LEARNING_RATE * size * batch


def full_learning_rate(basis: LearningRateBasis) -> float:
    """Full fine-tuning's automatic rate for ``basis``'s model and batch."""
    return reference_learning_rate(basis) * FULL_SCALE


def budget_scale(flops_share: float, forward_share: float) -> float:
    """The factor of a method that trains within ``flops_share`` of full fine-tuning's FLOPs: the share of the
    backward pass it buys, to the power ``BACKWARD_EXPONENT``, at least full fine-tuning's (a method that
    trains less never takes the smaller step; at a share of 1 it is full fine-tuning) and at most
    ``MAX_SCALE``."""
    bought = (min(flops_share, 1.0) - forward_share) / (1.0 - forward_share)
    if bought <= 0:
        return MAX_SCALE
    return min(MAX_SCALE, max(FULL_SCALE, bought**BACKWARD_EXPONENT))


def auto_learning_rate(basis: LearningRateBasis, factor: float) -> AutoLearningRate:
    """The automatic rate of a method whose factor is ``factor`` (``Method.learning_rate_scale``)."""
    full = full_learning_rate(basis)
    scale = factor / FULL_SCALE
    return AutoLearningRate(full * scale, full, scale)
