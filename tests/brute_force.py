"""The reference for select_tensors: the best mask found by trying every one."""

from __future__ import annotations

import math

import numpy as np

from greencore import TensorProfile

MAX_BRUTE = 16  # tensors enumerated by brute force: 2**16 masks


def best_by_brute_force(profile: TensorProfile, importance: dict[str, float], limit: float) -> float:
    """The largest summed importance of any mask whose step costs <= limit, trying every mask.

    Over every mask of the profile when it has at most MAX_BRUTE tensors; otherwise over every mask of the
    tensors with positive importance (at most MAX_BRUTE): a mask with a non-positive tensor is never better
    than the same mask without it, which is also feasible (a smaller mask never costs more).
    """
    n = len(profile.names)
    index = (
        list(range(n)) if n <= MAX_BRUTE else [i for i, k in enumerate(profile.names) if importance[k] > 0]
    )
    assert len(index) <= MAX_BRUTE
    sub = np.arange(1 << len(index), dtype=np.int64)
    masks = np.zeros_like(sub)
    value = np.zeros(sub.shape)
    for b, i in enumerate(index):
        on = (sub >> b) & 1
        masks |= on << i
        v = importance.get(profile.names[i], 0.0)
        value += (v if math.isfinite(v) else 0.0) * on
    cost = np.full(sub.shape, profile.fwd, dtype=np.int64)
    for bits, flops in profile.act_terms + profile.weight_terms:
        cost += flops * ((masks & bits) != 0)
    feasible = cost <= limit
    assert feasible[0], "the empty mask always fits a budget at or above the forward pass"
    return float(value[feasible].max())
