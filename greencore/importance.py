"""Tensor importance: how much the loss drops because a tensor is updated, measured and then undone.

GreenTrainer's importance of tensor k is ``I_k = -sum(g_k * dw_k)``: take one tentative optimizer step on the
batches (``dw = w_new - w_old``), compute the gradients ``g`` at the new weights, and read the first-order loss
increase that undoing tensor k's update alone would cause. Positive: the update helped.

Everything is put back exactly: weights bit for bit, ``requires_grad`` and ``.grad`` of every parameter, the
model's train/eval mode. The tentative step uses an optimizer built fresh over the candidate tensors, so the
training optimizer's state (moments, step counts) is never touched. Only the candidates are copied, each on its
own device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from greencore.flops import StepFlops
from greencore.profile import TensorProfile

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _accumulate_gradients(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Gradients of the mean loss over ``batches`` into ``.grad`` of the parameters that require one."""
    for batch in batches:
        loss = model(**batch).loss
        if loss is None:
            raise ValueError("the model returned no loss: each batch must carry labels")
        (loss / len(batches)).backward()


def tensor_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    optimizer_factory: OptimizerFactory,
    names: Iterable[str] | None = None,
) -> dict[str, float]:
    """Importance (loss reduction, in loss units) of each candidate tensor, from one tentative step.

    ``batches``: dicts of tensors passed as ``model(**batch)``, whose output has ``.loss``; their mean loss is
    used. ``optimizer_factory(params)`` builds the optimizer of the tentative step (the same kind as training,
    e.g. ``lambda ps: torch.optim.AdamW(ps, lr=lr)``). ``names``: the candidate tensors (names as
    ``model.named_parameters()`` gives them; a tied weight once); default every parameter that requires a
    gradient. Only candidates are made trainable, copied and stepped.

    The two passes run in eval mode (no dropout): the measurement is of the loss itself, and the random
    number stream training draws its dropout masks from is left alone. Returns name -> ``I_k``; a value that
    is not finite (a loss or gradient overflowing) is reported as 0.0, with a warning, so that no selection
    ever trains on it. Costs ``importance_flops(profile, names, len(batches))`` FLOPs.
    """
    params = dict(model.named_parameters())
    if names is None:
        names = [n for n, p in params.items() if p.requires_grad]
    candidates = list(dict.fromkeys(names))
    unknown = [n for n in candidates if n not in params]
    if unknown:
        raise KeyError(f"not parameters of this model: {unknown[:3]}")
    batches = list(batches)
    if not batches:
        raise ValueError("tensor_importance needs at least one batch")
    if not candidates:
        return {}

    was_training = model.training
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    saved_grads = {n: p.grad for n, p in params.items()}
    chosen = [params[n] for n in candidates]
    old: list[torch.Tensor] = []
    scores: dict[str, float] = {}
    try:
        model.eval()
        for n, p in params.items():
            p.requires_grad_(n in candidates)
            if n in candidates:
                p.grad = None  # backward accumulates in place: never into the caller's gradient
        with torch.no_grad():
            old = [p.detach().clone() for p in chosen]  # on the parameter's own device
        with torch.enable_grad():
            _accumulate_gradients(model, batches)
            optimizer_factory(chosen).step()
            for p in chosen:
                p.grad = None
            _accumulate_gradients(model, batches)
        with torch.no_grad():
            for n, p, w_old in zip(candidates, chosen, old, strict=True):
                if p.grad is None:  # the loss does not depend on it: its update cannot matter
                    scores[n] = 0.0
                    continue
                delta = p.detach().float() - w_old.float()
                scores[n] = -float(torch.sum(p.grad.float() * delta, dtype=torch.float64))
    finally:
        with torch.no_grad():
            for p, w_old in zip(chosen, old, strict=False):
                p.copy_(w_old)
        for n, p in params.items():
            p.requires_grad_(saved_flags[n])
            p.grad = saved_grads[n]
        model.train(was_training)

    bad = [n for n, v in scores.items() if not math.isfinite(v)]
    if bad:
        warnings.warn(
            f"importance of {len(bad)} tensors is not finite (loss or gradients overflowed); reported as 0.0",
            RuntimeWarning,
            stacklevel=2,
        )
        scores.update(dict.fromkeys(bad, 0.0))
    return scores


def importance_flops(profile: TensorProfile, names: Iterable[str] | None, n_batches: int) -> StepFlops:
    """FLOPs of one :func:`tensor_importance` call over ``n_batches`` batches of the profile's shape.

    Two forward+backward passes per batch with exactly the candidates trainable (the optimizer step itself
    costs no matmul FLOPs). ``names``: the candidates (default: every profiled tensor); names the profile does
    not hold cost nothing. Divide by the steps an evaluation serves to get ``select_tensors``'
    ``reserved_flops``.
    """
    if n_batches < 0:
        raise ValueError(f"n_batches must be >= 0, got {n_batches}")
    known = set(profile.names)
    mask = list(profile.names) if names is None else [n for n in names if n in known]
    if not mask:  # nothing to measure: tensor_importance returns at once
        return StepFlops(0, 0, 0)
    return profile.step_flops(mask).scaled(2 * n_batches)
