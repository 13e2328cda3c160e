"""FLOPs of one training step, split the way backpropagation spends them.

FLOPs here are counted as ``torch.utils.flop_counter.FlopCounterMode`` counts them: a multiply-add is 2 FLOPs,
and only matmul-like ops (mm, addmm, bmm, baddbmm, convolutions, fused attention kernels) cost anything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step: forward, activation gradients and weight gradients."""

    fwd: int
    bwd_act: int
    bwd_weight: int

    @property
    def total(self) -> int:
        return self.fwd + self.bwd_act + self.bwd_weight

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(
            self.fwd + other.fwd, self.bwd_act + other.bwd_act, self.bwd_weight + other.bwd_weight
        )

    def scaled(self, factor: int) -> StepFlops:
        """The same step repeated ``factor`` times."""
        return StepFlops(self.fwd * factor, self.bwd_act * factor, self.bwd_weight * factor)

    def as_dict(self) -> dict[str, int]:
        return {"fwd": self.fwd, "bwd_act": self.bwd_act, "bwd_weight": self.bwd_weight, "total": self.total}
