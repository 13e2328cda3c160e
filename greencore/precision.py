"""Precision of a run (``hyperparameters.precision``): what dtype each tensor is held in, and the autocast the
forward passes run under.

- ``fp32``: every tensor in float32, no autocast.
- ``bf16-mixed``: every tensor in float32 (weights, gradients, AdamW state); forward passes under bf16
  autocast (matmuls in bf16, reductions and norms in float32, as torch's autocast lists them).
- ``bf16``: matrices that do not train (linear weights, embeddings) are held in bf16; a tensor that trains is
  held in float32 (its master weight, its gradient and its AdamW state) from the first epoch it is selected
  on, and stays so; forward passes under bf16 autocast. The frozen part of the model, most of it at a small
  budget, costs half. Vectors (norm weights, biases) stay float32: they weigh nothing, and a norm whose
  parameters are bf16 refuses a float32 input (CPU's layer_norm: "mixed dtype"), which a float32 trained
  tensor upstream produces; float32 parameters take either input.

The same on CUDA and CPU (CPU autocast runs bf16 matmuls through oneDNN). The legacy setting ``bf16: true``
means ``bf16-mixed`` on CUDA and nothing on CPU, as it always did.

Checkpoints hold every tensor that never trained bit-identical to the base: a tensor whose value bf16 cannot
hold exactly (a base stored in float32) keeps its original beside the model, in host memory, and the
checkpoint and a later widening to float32 take that original (:class:`HeldPrecision`). A bf16 base, the usual
case for 1-8B models, keeps nothing: bf16 holds it exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from greencore.spec import Precision

__all__ = ["HeldPrecision", "Precision", "autocast", "resolve_precision", "tensor_dtypes"]


def resolve_precision(hp: Any, device_type: str) -> Precision:
    """The precision a run of ``hp`` (Hyperparameters) uses on ``device_type``: ``hp.precision``, or for the
    legacy ``bf16: true`` with precision left at fp32, bf16-mixed on CUDA."""
    precision = Precision(hp.precision)
    if precision == Precision.FP32 and getattr(hp, "bf16", False) and device_type == "cuda":
        return Precision.BF16_MIXED
    return precision


def autocast(precision: Precision, device_type: str) -> AbstractContextManager[Any]:
    """The autocast forward passes run under: bf16 for bf16-mixed and bf16, none for fp32."""
    if precision == Precision.FP32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def narrowed(param: torch.Tensor) -> bool:
    """Whether precision bf16 holds ``param`` in bf16 while it does not train: floating matrices and up."""
    return param.is_floating_point() and param.dim() >= 2


def tensor_dtypes(
    params: Iterable[tuple[str, torch.Tensor]], trained: Iterable[str], precision: Precision
) -> dict[str, torch.dtype]:
    """The dtype each floating parameter (name, tensor) is held in while ``trained`` train: bf16 for the
    frozen matrices under precision bf16, float32 for everything else."""
    trained = set(trained)
    bf16 = precision == Precision.BF16
    return {
        n: torch.bfloat16 if bf16 and n not in trained and narrowed(p) else torch.float32
        for n, p in params
        if p.is_floating_point()
    }


class HeldPrecision:
    """The dtypes of a model's parameters under ``bf16``: frozen ones bf16, trained ones float32.

    Parameters are switched by replacing ``param.data`` (the Parameter object stays, so an optimizer that
    holds it keeps holding it). Only floating parameters change; buffers keep their dtype. With another
    precision every method is a no-op."""

    def __init__(self, model: nn.Module, precision: Precision) -> None:
        self.model = model
        self.active = precision == Precision.BF16
        self._originals: dict[int, torch.Tensor] = {}  # id(param) -> its float32 value bf16 cannot hold

    def _params(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.is_floating_point())

    def narrow(self, keep: Iterable[str] = ()) -> None:
        """Hold every floating matrix not named in ``keep`` in bf16 (call before moving the model to its
        device, so that the device never holds the float32 copies). Originals that bf16 cannot hold exactly
        are kept on the CPU."""
        if not self.active:
            return
        keep = set(keep)
        with torch.no_grad():
            for name, p in self._params():
                if name in keep or p.dtype == torch.bfloat16 or not narrowed(p):
                    continue
                narrow = p.data.to(torch.bfloat16)
                if not torch.equal(narrow.to(p.dtype), p.data):
                    self._originals[id(p)] = p.data.detach().to("cpu", torch.float32, copy=True)
                p.data = narrow

    def widen(self, names: Iterable[str]) -> None:
        """Hold the parameters named in ``names`` in float32 from now on (their original where one is kept),
        on their device."""
        if not self.active:
            return
        names = set(names)
        with torch.no_grad():
            for name, p in self._params():
                if name in names and p.dtype != torch.float32:
                    p.data = self._wide(p)
                    self._originals.pop(id(p), None)

    def _wide(self, p: nn.Parameter) -> torch.Tensor:
        original = self._originals.get(id(p))
        if original is not None:
            return original.to(p.device, copy=True)
        return p.data.to(torch.float32)

    @contextlib.contextmanager
    def widened(self, names: Iterable[str]) -> Iterator[None]:
        """Hold the parameters named in ``names`` in float32 inside the block (an importance evaluation steps
        them tentatively: a bf16 update of a small step rounds to nothing), then put back exactly the bf16
        tensors they held."""
        if not self.active:
            yield
            return
        names = set(names)
        saved: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for name, p in self._params():
                    if name in names and p.dtype != torch.float32:
                        saved.append((p, p.data))
                        p.data = self._wide(p)
            yield
        finally:
            for p, held in saved:
                p.data = held

    def originals(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` (a state dict of the model) with each tensor that holds a kept original replaced by it:
        what a checkpoint writes."""
        if not self._originals:
            return tensors
        by_storage = {
            p.data.data_ptr(): self._originals[id(p)] for _, p in self._params() if id(p) in self._originals
        }
        return {n: by_storage.get(t.data_ptr(), t) if t.numel() else t for n, t in tensors.items()}
