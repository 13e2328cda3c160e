"""How a run is cut into steps, and what those steps cost: the one planner the training run and its estimate
share, so the two cannot drift.

An epoch's batches are a pure function of the data, the hyperparameters, the seed and the epoch
(``greencore.data.epoch_batches``); each batch is padded to a shape (``batch_shape``). FLOPs are linear in the
batch dimension, so a batch of shape ``(b, seq[, target])`` costs ``b`` times a batch of one row of that
shape: profiles are taken per row shape (``profile_model`` with batch 1, cached by model structure) and an
epoch's profile is the sum of its rows' (``TensorProfile.combine``).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from torch import nn

from greencore.data import Encoded, batch_shape, epoch_batches
from greencore.profile import (
    TensorProfile,
    attention_implementation,
    attention_of,
    checkpointing_of,
    gradient_checkpointing,
    profile_model,
)
from greencore.spec import Hyperparameters

Shape = tuple[int, ...]  # a padded batch: (batch, seq) or, for seq2seq, (batch, seq, target)


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's steps, in training order."""

    epoch: int  # 1-based
    batches: list[list[int]]  # example indices of each step
    shapes: list[Shape]  # each step's padded shape
    importance: int  # the leading batches importance is measured on (green)
    importance_rows: list[list[int]]  # the examples of each of those batches it is measured on
    importance_shapes: list[Shape]  # their padded shapes

    @property
    def first_step_from_importance(self) -> bool:
        """Whether green's importance pass computes the epoch's first training step: measured on the whole
        of one batch (its first gradients are then that step's), with more batches after it."""
        return self.importance == 1 and len(self.batches) > 1 and self.importance_rows[0] == self.batches[0]


def plan_epoch(data: Encoded, hp: Hyperparameters, seed: int, epoch: int) -> EpochPlan:
    """The steps of epoch ``epoch``: the same for the run, for a resumed run and for the estimate."""
    batches = epoch_batches(data, hp.batch_size, seed, epoch, hp.max_seq_len, hp.importance_batches)
    shapes = [batch_shape(data, idx, hp.max_seq_len) for idx in batches]
    n = min(hp.importance_batches, len(batches))
    # Importance on part of a batch: its first rows, padded to their own longest (as a batch of them is).
    rows = [idx[: hp.importance_rows] for idx in batches[:n]]
    measured = [batch_shape(data, idx, hp.max_seq_len) for idx in rows]
    return EpochPlan(epoch, batches, shapes, n, rows, measured)


# Profiles by model structure, attention implementation, checkpointing and row shape, kept across runs in this
# process: a profile depends on the architecture, the config, the attention kernel (eager and SDPA backwards
# differ), whether layers are recomputed, and the shape, never on the weights, so a worker training one base
# model job after job traces each shape once.
_PROFILE_CACHE: OrderedDict[tuple[str, tuple[str | None, ...], bool, Shape], TensorProfile] = OrderedDict()
PROFILE_CACHE_SIZE = 512  # profiles kept (each holds a few hundred cost terms)


def clear_profile_cache() -> None:
    """Forget every cached profile (a benchmark charging each run its own profiling)."""
    _PROFILE_CACHE.clear()


def model_structure(model: nn.Module) -> str:
    """A digest of what a profile depends on: the model's classes, modules, parameter shapes and config."""
    config = getattr(model, "config", None)
    params = [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    what = (
        type(model).__qualname__,
        repr(model),
        params,
        config.to_json_string() if config is not None else None,
    )
    return hashlib.sha256(repr(what).encode()).hexdigest()


class ShapeProfiles:
    """Profiles of one model's training steps by batch shape, and full fine-tuning's FLOPs of its base.

    ``baseline``: a context in which the model is the base that full fine-tuning would train (LoRA's adapters
    switched off: ``Method.full_baseline``); None when the model is that base. ``attention``: the attention
    implementation the steps run ("eager", "sdpa"); None: the model's own. ``checkpointing``: whether the
    steps checkpoint the model's layers (their recompute is counted); None: as the model is set.
    """

    def __init__(
        self,
        model: nn.Module,
        baseline: Callable[[], AbstractContextManager[None] | None] | None = None,
        attention: str | None = None,
        checkpointing: bool | None = None,
    ) -> None:
        self.model = model
        self.structure = model_structure(model)
        self.baseline = baseline
        self.attention = attention
        self.checkpointing = checkpointing

    def _row(self, structure: str, row: Shape) -> TensorProfile:
        with (
            attention_implementation(self.model, self.attention),
            gradient_checkpointing(self.model, self.checkpointing),
        ):
            key = (structure, attention_of(self.model), checkpointing_of(self.model), row)
            if key in _PROFILE_CACHE:
                _PROFILE_CACHE.move_to_end(key)
                return _PROFILE_CACHE[key]
            profile = profile_model(self.model, 1, row[0], row[1] if len(row) > 1 else None)
        _PROFILE_CACHE[key] = profile
        while len(_PROFILE_CACHE) > PROFILE_CACHE_SIZE:
            _PROFILE_CACHE.popitem(last=False)
        return profile

    def steps(self, shapes: Sequence[Shape]) -> TensorProfile:
        """The profile of these steps together: ``step_flops(mask)`` is their summed FLOPs with that mask."""
        return TensorProfile.combine((self._row(self.structure, row), n) for row, n in _rows(shapes))

    def full(self, shapes: Sequence[Shape]) -> int:
        """FLOPs of full fine-tuning of the base model over these steps."""
        context = self.baseline() if self.baseline is not None else None
        key = self.structure if context is None else "base:" + self.structure
        with context or contextlib.nullcontext():
            return sum(self._row(key, row).full.total * n for row, n in _rows(shapes))


def _rows(shapes: Sequence[Shape]) -> list[tuple[Shape, int]]:
    """(row shape, rows of it) over these batches, in a fixed order."""
    rows: Counter[Shape] = Counter()
    for shape in shapes:
        rows[shape[1:]] += shape[0]
    return sorted(rows.items())
