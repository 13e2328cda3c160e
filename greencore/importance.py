"""Tensor importance: how much the loss drops because a tensor is updated, measured and then undone.

GreenTrainer's importance of tensor k is the loss reduction its update buys: take one tentative optimizer step
on the batches (``dw = w_new - w_old``), with the gradients ``g0`` at the old weights and ``g1`` at the new
ones, and

    I_k = -sum((g0_k + g1_k) / 2 * dw_k)

(the trapezoid rule along the step; positive: the update helped). The paper's code reads
``-sum(g1_k * dw_k)``, the first-order loss increase of undoing k's update at the new weights. That estimate
is low by about ``dw_k . H . dw_k / 2``, which grows with the square of the step: once the joint step of all
candidates passes the minimum along its line (a large learning rate, or a model already fitted by earlier
epochs), ``g1`` points back and every tensor reads as harmful although the loss fell, so the selection trains
nothing or next to nothing. The trapezoid rule is exact for a quadratic loss (the importances then sum to
``L(w_old) - L(w_new)``), agrees with the paper's value to first order, and costs nothing more: ``g0`` is the
first pass's gradient. ``rule="first_order"`` gives the paper's estimate.

The tentative step is meant to be the training optimizer's next step: :func:`tentative_optimizer_factory`
builds a copy of it (its moments, step counts and scheduled learning rate), as the paper's code steps its
training optimizer. Everything is put back exactly: weights bit for bit, ``requires_grad`` and ``.grad`` of
every parameter, the model's train/eval mode, and the training optimizer is never touched.

Memory: besides the model and the activations of one pass, the evaluation holds one copy of each candidate's
weights (to put them back) and its first gradient ``g0``, both off the memory the model trains in
(``offload``): in host memory when the model is on CUDA, in a temporary file when it is on the CPU (a
:class:`Spill`: the host's memory is the one the step needs); and its second gradient ``g1``, freed tensor
by tensor as the scores are taken; the tentative optimizer's state (Adam's two moments) exists for one tensor
at a time, as the candidates are stepped one by one (each tensor's Adam step depends on its own gradient and
state only). The candidates are stepped and scored smallest first, so that the temporaries of a large tensor
(its moments, or its dw and a copy read back) come when the small ones' gradients are gone, and a tensor's
weights are put back before its score is taken. The evaluation then holds in the model's memory what a
training step of the candidates holds (one gradient each, beside the training optimizer's state), and its peak
stays within that step's: equal to it for 8B-class shapes replayed for CUDA and on a 374M model on the CPU
(bench/results/memory.md).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from greencore.distributed import local
from greencore.flops import StepFlops
from greencore.profile import TensorProfile

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _accumulate_gradients(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None,
    autocast: AbstractContextManager[Any],
) -> float:
    """Gradients of the mean loss over ``batches`` (weighted by ``weights``; None: equally) into ``.grad`` of
    the parameters that require one, the forwards under ``autocast``; returns that mean loss."""
    total = 0.0
    for i, batch in enumerate(batches):
        with autocast:
            loss = model(**batch).loss
        if loss is None:
            raise ValueError("the model returned no loss: each batch must carry labels")
        if weights is None:
            (loss / len(batches)).backward()
            total += float(loss.detach()) / len(batches)
        else:
            (loss if weights[i] == 1.0 else loss * weights[i]).backward()
            total += float(loss.detach()) * weights[i]
    return total


@dataclass
class ImportancePass:
    """What one importance measurement found: the scores, and the first pass's loss and gradients.

    ``gradients`` are the candidates' gradients of the mean loss at the weights as they were (``g0``), which
    is what a training step on the same batches computes for those tensors (in eval mode, float32): the
    trainer takes the epoch's first step from them instead of computing it again.
    """

    scores: dict[str, float]
    loss: float  # the mean loss over the batches, before the tentative step
    gradients: Mapping[str, torch.Tensor] = field(
        default_factory=dict
    )  # name -> g0 (candidates with a gradient); a spilled one is read back when it is looked up


def training_optimizer(params: list[nn.Parameter], hp: Any, device_type: str) -> torch.optim.Optimizer:
    """The AdamW a run trains ``params`` with (``hp``: its Hyperparameters): fused on CUDA (one kernel per
    step and no temporaries; the multi-tensor one holds a float32 copy of every trained tensor at its peak), a
    loop over tensors on CPU (torch's default there, named because fake tensors do not tell their device)."""
    cuda = device_type == "cuda"
    return torch.optim.AdamW(
        params,
        lr=hp.learning_rate,
        weight_decay=hp.weight_decay,
        foreach=None if cuda else False,
        fused=True if cuda else None,
    )


def tentative_optimizer_factory(optimizer: torch.optim.Optimizer) -> OptimizerFactory:
    """The optimizer factory whose step is ``optimizer``'s next step, without touching ``optimizer``.

    The optimizer it builds over the given parameters is of ``optimizer``'s class, each parameter in a group
    holding the hyperparameters of its training group as they are now (the learning rate the scheduler set for
    the next step, betas, eps, weight decay), with a clone of the training state of that parameter (Adam's
    moments and step count, on the parameter's device). A parameter the training optimizer holds no state for
    yet starts fresh, as its first training step would; one it does not hold gets its defaults.
    """

    def factory(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        grouped: dict[int, list[nn.Parameter]] = {}
        for p in params:
            grouped.setdefault(group_of.get(id(p), -1), []).append(p)
        groups = []
        for i, ps in grouped.items():
            settings = optimizer.param_groups[i] if i >= 0 else optimizer.defaults
            groups.append({**{k: _clone(v) for k, v in settings.items() if k != "params"}, "params": ps})
        tentative = type(optimizer)(groups)
        for p in params:
            if p in optimizer.state:
                tentative.state[p] = {k: _clone(v) for k, v in optimizer.state[p].items()}
        return tentative

    return factory


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def tensor_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    optimizer_factory: OptimizerFactory,
    names: Iterable[str] | None = None,
    rule: Literal["trapezoid", "first_order"] = "trapezoid",
) -> dict[str, float]:
    """Importance (loss reduction, in loss units) of each candidate tensor, from one tentative step: the
    scores of :func:`importance_pass`, which documents the arguments."""
    return importance_pass(model, batches, optimizer_factory, names, rule).scores


def importance_pass(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    optimizer_factory: OptimizerFactory,
    names: Iterable[str] | None = None,
    rule: Literal["trapezoid", "first_order"] = "trapezoid",
    weights: Sequence[float] | None = None,
    autocast: AbstractContextManager[Any] | None = None,
    offload: bool | None = None,
    sum_over_ranks: Callable[[list[float]], list[float]] | None = None,
) -> ImportancePass:
    """Importance (loss reduction, in loss units) of each candidate tensor, from one tentative step, with the
    first pass's loss and gradients (see :class:`ImportancePass`).

    ``batches``: dicts of tensors passed as ``model(**batch)``, whose output has ``.loss``; their mean loss is
    used. ``optimizer_factory(params)`` builds the optimizer of the tentative step: in training,
    ``tentative_optimizer_factory(training_optimizer)``; any factory works (e.g.
    ``lambda ps: torch.optim.AdamW(ps, lr=lr)``, a fresh optimizer). ``names``: the candidate tensors (names
    as ``model.named_parameters()`` gives them; a tied weight once); default every parameter that requires a
    gradient. Only candidates are made trainable, copied and stepped. ``rule``: ``"trapezoid"`` (``-(g0 + g1)
    / 2 . dw``) or the paper's ``"first_order"`` (``-g1 . dw``); see the module's docstring. ``weights``: each
    batch's weight in the mean loss (default equal: 1 / len(batches)), e.g. the micro-batches of one batch
    weighted by their share of its loss terms. ``autocast``: the context each forward runs under (the training
    step's; default none). ``offload``: keep the saved weights and the first gradients off the memory the
    candidates live in (default: when they are not sharded): a device's tensors in host memory (the gradients
    returned are then host tensors), the CPU's in a :class:`Spill` file (the gradients returned are read back
    from it when looked up).
    ``sum_over_ranks``: on ranks that each hold a shard of every tensor (FSDP2, ``greencore.sharded``) and
    their rows of the batches (weighted by their share of the loss, so that the gradients summed over ranks
    are the batches'), the sum over ranks of a list of numbers: each rank scores its shards, and a tensor's
    score and the loss are the sums over ranks (the same on every rank).

    The two passes run in eval mode (no dropout): the measurement is of the loss itself, and the random
    number stream training draws its dropout masks from is left alone. Scores: name -> ``I_k``; a value that
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
    if weights is not None and len(weights) != len(batches):
        raise ValueError(f"{len(weights)} weights for {len(batches)} batches")
    if autocast is None:
        autocast = contextlib.nullcontext()
    if rule not in ("trapezoid", "first_order"):
        raise ValueError(f"rule must be 'trapezoid' or 'first_order', not {rule!r}")
    if not candidates:
        return ImportancePass({}, math.nan)

    was_training = model.training
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    saved_grads = {n: p.grad for n, p in params.items()}
    chosen = [params[n] for n in candidates]
    if offload is None:  # sharded, each rank keeps one shard of each where it trains
        offload = sum_over_ranks is None
    if offload and sum_over_ranks is not None:
        raise ValueError("offload keeps whole tensors off the device: not for sharded ones (sum_over_ranks)")
    keep = _Keeper(offload)
    old: list[Kept] = []
    first: list[Kept | None] = [None] * len(chosen)  # g0, by candidate
    scores: dict[str, float] = {}
    loss = math.nan
    try:
        model.eval()
        for n, p in params.items():
            p.requires_grad_(n in candidates)
            if n in candidates:
                p.grad = None  # backward accumulates in place: never into the caller's gradient
        with torch.no_grad():
            old = [keep.put(p.detach(), copy=True) for p in chosen]
        with torch.enable_grad():
            loss = _accumulate_gradients(model, batches, weights, autocast)
            # One tensor at a time: the tentative optimizer's state (Adam's two moments, cloned from the
            # training optimizer's) lives for one tensor's step, never for every candidate at once. Each
            # tensor's Adam step depends on its own gradient and state only, so the step is the joint one.
            # g0 is kept as backward left it (the step reads it and does not change it), or offloaded.
            # Smallest first: offloaded, each g0 leaves the device once its tensor is stepped, so the large
            # tensors' steps (two moments cloned) come when the small ones' gradients are gone.
            by_size = sorted(range(len(chosen)), key=lambda i: chosen[i].numel())
            for i in by_size:
                p = chosen[i]
                if p.grad is not None:
                    optimizer_factory([p]).step()
                    first[i] = keep.put(p.grad.detach())
                p.grad = None
            _accumulate_gradients(model, batches, weights, autocast)
        with torch.no_grad():
            for i in by_size:  # the small ones' g1 freed first, as above
                n, p = candidates[i], chosen[i]
                w_old = keep.back(old[i], p)
                # dw, then the weights put back at once: the saved copy (and its copy on the device) go
                # before the gradients are read, so a tensor's score holds at most two temporaries its size.
                delta = None if p.grad is None else local(p.detach()).float() - local(w_old).float()
                p.copy_(w_old)
                old[i] = p
                del w_old
                if delta is None:  # the loss does not depend on it: its update cannot matter
                    scores[n] = 0.0
                    continue
                # The score is a sum over elements: each shard's, summed over ranks below. g1 is done with
                # after this: the sum and the product are taken in its own storage, and it is freed tensor by
                # tensor.
                grad = local(p.grad).float()
                p.grad = None
                g0 = first[i]
                halve = rule == "trapezoid" and g0 is not None
                if halve:  # g0 is the first step's gradient too: never changed
                    grad.add_(local(keep.back(g0, p)).float())
                total = float(torch.sum(grad.mul_(delta), dtype=torch.float64))
                scores[n] = -(total / 2 if halve else total)
                del delta, grad
    finally:
        with torch.no_grad():
            for p, w_old in zip(chosen, old, strict=False):
                if w_old is not p:
                    p.copy_(keep.back(w_old, p))
        for n, p in params.items():
            p.requires_grad_(saved_flags[n])
            p.grad = saved_grads[n]
        model.train(was_training)

    scores = {n: scores[n] for n in candidates}  # in the candidates' order (they were taken by size)
    if sum_over_ranks is not None:
        *summed, loss = sum_over_ranks([scores[n] for n in candidates] + [loss])
        scores = dict(zip(candidates, summed, strict=True))
    bad = [n for n, v in scores.items() if not math.isfinite(v)]
    if bad:
        warnings.warn(
            f"importance of {len(bad)} tensors is not finite (loss or gradients overflowed); reported as 0.0",
            RuntimeWarning,
            stacklevel=2,
        )
        scores.update(dict.fromkeys(bad, 0.0))
    gradients = keep.mapping({n: g for n, g in zip(candidates, first, strict=True) if g is not None})
    return ImportancePass(scores, loss, gradients)


class Spilled:
    """Where :class:`Spill` wrote a tensor: its offset in the file, its shape and dtype."""

    __slots__ = ("dtype", "offset", "shape")

    def __init__(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.offset, self.shape, self.dtype = offset, shape, dtype


class Spill:
    """Tensors written to an unnamed temporary file and read back one at a time: where a CPU run's importance
    evaluation keeps its copies, so that the host memory the step trains in never holds them (a GPU run keeps
    them in host memory). The file is in ``GT_SPILL_DIR``, else the system's temporary directory (on a tmpfs
    that is memory again), and is gone when the Spill is."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(dir=os.environ.get("GT_SPILL_DIR") or None)
        self._end = 0

    def put(self, t: torch.Tensor) -> Spilled:
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        raw = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        at, done = self._end, 0
        while done < len(raw):  # one call writes at most about 2 GB
            done += os.pwrite(self._file.fileno(), raw[done:], at + done)
        self._end += len(raw)
        return Spilled(at, tuple(t.shape), t.dtype)

    def get(self, where: Spilled) -> torch.Tensor:
        out = torch.empty(where.shape, dtype=where.dtype)
        raw = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(raw):
            read = os.preadv(self._file.fileno(), [raw[done:]], where.offset + done)
            if read <= 0:
                raise OSError(f"spill file ended at {where.offset + done} bytes")
            done += read
        return out


Kept = torch.Tensor | Spilled


class _Keeper:
    """Keeps the importance evaluation's copies: as they are, or ``offload``ed off the memory the model trains
    in (a device's tensors to host memory, the CPU's to a :class:`Spill`). Allocations made for host memory,
    and the fake tensors of a replay (which cannot be written to a file), are marked
    (``greencore.memory.host_memory``) so that a replay of the pass on fake tensors does not count them."""

    def __init__(self, offload: bool) -> None:
        self.offload = offload
        self._spill: Spill | None = None

    def put(self, t: torch.Tensor, copy: bool = False) -> Kept:
        """``t`` (a copy when ``copy``), or, offloaded, a copy of it off its memory."""
        if not self.offload:
            return t.clone() if copy else t
        if t.device.type == "cpu" and not _fake(t):
            if self._spill is None:
                self._spill = Spill()
            return self._spill.put(t)
        from greencore.memory import host_memory

        with host_memory():
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            host.copy_(t)
        return host

    def back(self, kept: Kept, p: torch.Tensor) -> torch.Tensor:
        """What :meth:`put` kept, on ``p``'s device (a transient copy when it was offloaded)."""
        if isinstance(kept, Spilled):
            assert self._spill is not None
            return self._spill.get(kept)
        return kept.to(p.device, copy=True) if self.offload else kept

    def mapping(self, kept: dict[str, Kept | None]) -> Mapping[str, torch.Tensor]:
        """``kept`` as tensors: spilled ones read back when looked up (the spill file lives as long as it)."""
        if self._spill is None:
            return kept  # type: ignore[return-value]
        return _SpilledTensors(self._spill, kept)


class _SpilledTensors(Mapping[str, torch.Tensor]):
    def __init__(self, spill: Spill, kept: dict[str, Kept | None]) -> None:
        self._spill, self._kept = spill, kept

    def __getitem__(self, name: str) -> torch.Tensor:
        kept = self._kept[name]
        return self._spill.get(kept) if isinstance(kept, Spilled) else kept  # type: ignore[return-value]

    def __iter__(self) -> Iterator[str]:
        return iter(self._kept)

    def __len__(self) -> int:
        return len(self._kept)


def _fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


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
