"""FLOPs of one training step, split the way backpropagation spends them, and the counting rules.

FLOPs here are counted as ``torch.utils.flop_counter.FlopCounterMode`` counts them: a multiply-add is 2 FLOPs,
and only matmul-like ops (mm, addmm, bmm, baddbmm, convolutions, fused attention kernels) cost anything.

Importing this module also teaches FlopCounterMode the one attention kernel it does not count by itself:
CPU's fused SDPA kernel (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward), counted with
the formula torch uses for the CUDA flash, memory-efficient and cuDNN kernels (docs/flops.md). Everything
that profiles or measures FLOPs imports it (``greencore.profile``, ``greencore.train``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import (
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)


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


_aten = torch.ops.aten
CPU_SDPA = _aten._scaled_dot_product_flash_attention_for_cpu  # (query, key, value, ...) -> (out, logsumexp)
CPU_SDPA_BACKWARD = _aten._scaled_dot_product_flash_attention_for_cpu_backward  # (grad_out, q, k, v, ...)


def _cpu_sdpa_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    # The scores and value matmuls over every (query, key) pair, as torch counts CUDA's flash kernel:
    # 4*b*h*s_q*s_k*d (torch.utils.flop_counter.sdpa_flop_count; a causal mask's skipped half is counted).
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(
    grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    # The kernel computes the gradients of query, key and value together, whichever of them autograd needs:
    # the scores recomputed, then grad scores, grad value, grad query and grad key: five batched matmuls
    # (torch.utils.flop_counter.sdpa_backward_flop_count, as for CUDA's kernels).
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _register_cpu_attention() -> None:
    """Register the CPU SDPA formulas once (a torch that counts the kernel itself keeps its own)."""
    if CPU_SDPA not in flop_registry:
        register_flop_formula(CPU_SDPA)(_cpu_sdpa_flop)
    if CPU_SDPA_BACKWARD not in flop_registry:
        register_flop_formula(CPU_SDPA_BACKWARD)(_cpu_sdpa_backward_flop)


_register_cpu_attention()
