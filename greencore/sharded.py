"""FSDP2 for GreenTrainer (``hyperparameters.distributed = "fsdp"``): every rank holds one shard of each
tensor, so a model whose weights, gradients and AdamW state do not fit one device trains on several.

- Each transformer layer (the layers transformers can checkpoint) and then the root are wrapped once with
  ``torch.distributed.fsdp.fully_shard``. The trained set changes per selection through ``requires_grad``
  alone: FSDP2 reads it again at every all-gather and reduce-scatters only the tensors that got a gradient,
  so nothing is wrapped anew (unlike DDP, ``greencore.distributed.wrap``).
- Gradients are summed over ranks, not averaged (``set_gradient_divide_factor(1)``): each rank's loss is
  already weighted by its rows' share of the batch's loss terms, so the sum is one process's gradient.
- AdamW steps each rank's shard (it is elementwise); gradient clipping takes the norm of DTensor gradients,
  which torch reduces over the shards. The importance of a tensor, ``-sum(g * dw)``, is a sum over its
  elements: each rank scores its shard and the scores are summed over ranks (one all-reduce).
- Checkpoints hold full tensors: every tensor is gathered, one at a time, and rank 0 assembles a host copy
  of the model (:func:`host_model`) that the method exports as it exports one process's model. The AdamW
  state is gathered the same way, so a checkpoint does not depend on the engine or the number of ranks.
- Backward gathers only the layers it enters (:meth:`Sharded.set_trained`): FSDP2 would prefetch each
  layer's tensors before the backward of the layer above it, also below the deepest trained tensor, where
  backward never goes.
- Every collective FSDP2 runs goes through :class:`CountingAllGather` and :class:`CountingReduceScatter`,
  which count the bytes of the full buffer each one moves (what DDP's hook counts for an all-reduce).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
from torch.distributed.tensor import DTensor, distribute_tensor

from greencore.distributed import Ranks
from greencore.profile import checkpointable_layers


class CountingAllGather(DefaultAllGather):
    """FSDP2's all-gather of one module's shards, counting the gathered buffer's bytes into ``ranks``; its
    size (every tensor of the module, padded to the ranks) is kept in ``bytes``."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.bytes = 0

    def __call__(self, output_tensor, input_tensor, group, async_op=False):  # FSDP2 passes keywords
        self.bytes = output_tensor.numel() * output_tensor.element_size()
        self.ranks.communicated += self.bytes
        return super().__call__(output_tensor, input_tensor, group, async_op)


class CountingReduceScatter(DefaultReduceScatter):
    """FSDP2's reduce-scatter of one module's gradients (those that got one), counting the input's bytes."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.ranks.communicated += input_tensor.numel() * input_tensor.element_size()
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


@dataclass
class Sharded:
    """A model wrapped by :func:`shard`: its FSDP modules (the layers, then the root) and their counters."""

    modules: list[FSDPModule]  # the layers in forward order, then the root
    gathers: list[CountingAllGather] = field(default_factory=list)  # aligned with modules
    layer_names: list[set[str]] = field(default_factory=list)  # each layer's tensors, as the model names them
    below: set[str] = field(default_factory=set)  # the root's tensors before the first layer (embeddings)

    def set_trained(self, names: Iterable[str] | None) -> None:
        """Prefetch in backward only the layers a backward with ``names`` trainable enters (None: every
        layer, as FSDP2 does by default): those from the deepest layer holding one of them up (every layer
        when a root tensor before the first layer trains). Layers are taken in the model's order; a layer
        entered without its prefetch is gathered by its own backward hook, so this changes what is
        exchanged, never what is computed."""
        layers, root = self.modules[:-1], self.modules[-1]
        if not layers:
            return
        trained = None if names is None else set(names)
        deepest = 0
        if trained is not None and not trained & self.below:
            deepest = next((i for i, ns in enumerate(self.layer_names) if ns & trained), len(layers))
        # FSDP2 takes an empty list for its default order: a module prefetching itself prefetches nothing.
        for i in range(1, len(layers)):
            layers[i].set_modules_to_backward_prefetch([layers[i - 1] if i - 1 >= deepest else layers[i]])
        root.set_modules_to_backward_prefetch([layers[-1] if deepest < len(layers) else root])

    def set_gradient_sync(self, sync: bool) -> None:
        """Reduce-scatter the gradients at the end of the next backward (True), or keep accumulating them
        unsharded (False: the micro-batches of a step before its last)."""
        self.modules[-1].set_requires_gradient_sync(sync)

    def full_step_bytes(self, passes: int) -> int:
        """What one step of full fine-tuning exchanges with ``passes`` forward and backward passes (its
        micro-batches): each pass all-gathers every module in forward and every module but the root again in
        backward (the root stays gathered between them), and the step reduce-scatters every gradient (the
        size of each module's gathered buffer). Known once each module was gathered (after a forward)."""
        every = sum(g.bytes for g in self.gathers)
        return passes * (2 * every - self.gathers[-1].bytes) + every


def shard(model: nn.Module, ranks: Ranks) -> Sharded:
    """Wrap each transformer layer of ``model`` (on its device) and then ``model`` itself with FSDP2,
    gradients summed over ranks, every collective counted into ``ranks.communicated``. The model's
    parameters become DTensors (new Parameter objects under the same names)."""
    layers = checkpointable_layers(model)
    names = [n for n, _ in model.named_parameters()]
    prefixes = {id(m): n + "." for n, m in model.named_modules()}
    layer_names = [{n for n in names if n.startswith(prefixes[id(layer)])} for layer in layers]
    inside = set().union(*layer_names)
    first = next((i for i, n in enumerate(names) if n in inside), len(names))
    modules: list[FSDPModule] = []
    for layer in layers:
        fully_shard(layer)
        modules.append(layer)  # type: ignore[arg-type]  # fully_shard made it an FSDPModule
    fully_shard(model)
    modules.append(model)  # type: ignore[arg-type]
    gathers = []
    for module in modules:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied one)
        gather = CountingAllGather(ranks)
        module.set_custom_all_gather(gather)
        module.set_custom_reduce_scatter(CountingReduceScatter(ranks))
        gathers.append(gather)
    return Sharded(modules, gathers, layer_names, set(names[:first]))


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device (no memory for its tensors): what the profiles trace and the
    checkpoints export after ``model`` is sharded. Tied tensors stay tied."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _full(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """``t`` whole in host memory when ``keep`` (a DTensor is gathered: every rank must call), else None."""
    whole = t.full_tensor() if isinstance(t, DTensor) else t
    return whole.detach().to("cpu", copy=True) if keep else None


def gather_state(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The state dict of a sharded ``model`` with full tensors in host memory, on the rank that ``keep``s
    them (an empty dict elsewhere); every rank must call. A tied tensor is gathered once."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor | None] = {}
    for name, t in model.state_dict().items():
        if id(t) not in seen:
            seen[id(t)] = _full(t, keep)
        whole = seen[id(t)]
        if whole is not None:
            out[name] = whole
    return out


def host_model(twin: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the meta ``twin`` holding ``tensors`` (a full state dict, from :func:`gather_state`)."""
    host = copy.deepcopy(twin)
    tied: dict[int, list[str]] = {}
    for name, p in host.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    host.load_state_dict(tensors, assign=True)  # one new Parameter per name: tie them again
    for first, *others in tied.values():
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(host.get_submodule(owner), attr, host.get_parameter(first))
    return host


def gather_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every DTensor state gathered whole into host memory on the rank that
    ``keep``s it (elsewhere an empty dict): the state one process would save. Every rank must call."""
    state = optimizer.state_dict()
    gathered = {
        i: {k: _full(v, keep) if isinstance(v, DTensor) else v for k, v in s.items()}
        for i, s in sorted(state["state"].items())
    }
    return {"state": gathered, "param_groups": state["param_groups"]} if keep else {}


def shard_optimizer_state(state: dict[str, Any], params: Iterable[nn.Parameter]) -> dict[str, Any]:
    """A full optimizer state dict (one process's, or :func:`gather_optimizer_state`'s) with each tensor of
    a sharded parameter's state cut to this rank's shard (no communication: every rank read it whole)."""
    by_index = dict(enumerate(params))
    out = {}
    for i, s in state["state"].items():
        p = by_index[int(i)]
        out[i] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape
            else v
            for k, v in s.items()
        }
    return {"state": out, "param_groups": state["param_groups"]}
