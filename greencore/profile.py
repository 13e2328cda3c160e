"""Exact per-tensor FLOPs of a training step, read from the autograd graph the model itself builds.

How it works, in one pass over the model on fake tensors (no weights touched, no FLOPs spent):

1. Every parameter is replaced by a fake twin (shapes, no data) that requires a gradient, and one forward runs
   under ``FlopCounterMode`` (that is ``fwd``) and under a dispatch recorder that notes every op
   FlopCounterMode would count (mm, addmm, bmm, convolutions, fused attention, ...), with the shapes of its
   inputs and the autograd node each input comes from.
2. A small leaf is added to the output of the input embeddings, so that every tensor that depends on the data
   is marked: an input gradient that flows towards the data is an *activation* gradient; one that flows only
   to parameters is a *weight* gradient.
3. For each recorded op reached from the loss, the backward cost of each of its inputs is measured by running
   that op alone, on meta tensors of the same shapes and strides, under FlopCounterMode with only that input
   requiring a gradient. This is what autograd will run, counted the way FlopCounterMode counts it.
4. Walking the autograd graph gives, for each such input, the set of parameters upstream of it. Autograd
   computes that input's gradient exactly when one of them is trainable.

So a mask ``m`` costs ``fwd + sum(cost for (upstream, cost) in terms if upstream & m)``, with no per-
architecture formula: frozen tensors skip their weight gradient, nothing below the deepest trainable tensor
of each path is computed, and parallel branches (q/k/v, parallel attention and MLP, grouped-query attention)
are charged as they run. A fused kernel that computes all its input gradients at once (SDPA's backward) is
one term over all its inputs: paid once when any of them needs a gradient.

Attention is counted as the implementation the model is configured with runs it (``config.
_attn_implementation``: "eager" or "sdpa"), or the one ``attention=`` names; the training step runs the same
one. FlopCounterMode counts CPU's SDPA kernel through the formula ``greencore.flops`` registers.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from greencore.flops import StepFlops  # also registers CPU SDPA's FLOP formula with FlopCounterMode

Mask = Sequence[bool] | Iterable[str]


class ProfileError(RuntimeError):
    """The model could not be traced (its forward failed on fake tensors)."""


@dataclass(frozen=True)
class _Spec:
    """Shape, strides and dtype of a tensor seen by the recorder; enough to rebuild it on meta."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def build(self, requires_grad: bool) -> torch.Tensor:
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")
        return t.requires_grad_(requires_grad)


@dataclass
class _OpRecord:
    func: Any
    leaves: list[Any]  # flattened (args, kwargs) with tensors replaced by _Spec
    treespec: Any
    sources: dict[int, Any]  # leaf position -> autograd node or leaf tensor the input comes from
    outputs: list[torch.Tensor]
    node: Any = None  # the autograd node of the first differentiable output, once autograd has set it


def _packet(func: Any) -> Any:
    return getattr(func, "overloadpacket", func)


class _Recorder(TorchDispatchMode):
    """Notes every op FlopCounterMode counts, with where each of its inputs comes from in autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[_OpRecord] = []
        self._pending: list[_OpRecord] = []

    def resolve(self) -> None:
        # Autograd attaches grad_fn to an op's outputs only after the op returns from dispatch (and may
        # dispatch a few ops of its own first), so a record's node is read at a later dispatched op: the first
        # one that sees it set, always before any in-place op could replace the output's grad_fn.
        still = []
        for rec in self._pending:
            rec.node = next((o.grad_fn for o in rec.outputs if o.grad_fn is not None), None)
            if rec.node is None:
                still.append(rec)
        self._pending = still

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.resolve()
        out = func(*args, **kwargs)
        if _packet(func) in flop_registry:
            leaves, treespec = tree_flatten((args, kwargs))
            specs: list[Any] = []
            sources: dict[int, Any] = {}
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, torch.Tensor):
                    specs.append(_Spec(tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype))
                    if leaf.grad_fn is not None:
                        sources[i] = leaf.grad_fn
                    elif leaf.requires_grad:
                        sources[i] = leaf
                else:
                    specs.append(leaf)
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            rec = _OpRecord(func, specs, treespec, sources, outs)
            self.records.append(rec)
            if sources:  # an op with no input needing grad never gets an autograd node
                self._pending.append(rec)
        return out


# Backward cost of one op for a subset of its inputs requiring grad, keyed by the op, its input specs and the
# subset. Transformer layers repeat, so a 32-layer model measures each distinct op once.
_BACKWARD_CACHE: dict[Any, int] = {}


def _hashable(leaf: Any) -> Any:
    if isinstance(leaf, _Spec | int | float | bool | str | type(None) | torch.dtype):
        return leaf
    return repr(leaf)


def _backward_flops(rec: _OpRecord, grad_positions: tuple[int, ...]) -> int:
    """FLOPs FlopCounterMode counts for this op's backward when exactly ``grad_positions`` need a gradient."""
    key = (rec.func, tuple(_hashable(x) for x in rec.leaves), grad_positions)
    if key in _BACKWARD_CACHE:
        return _BACKWARD_CACHE[key]
    leaves = [x.build(i in grad_positions) if isinstance(x, _Spec) else x for i, x in enumerate(rec.leaves)]
    args, kwargs = tree_unflatten(leaves, rec.treespec)
    inputs = [leaves[i] for i in grad_positions]
    with torch.enable_grad():
        out = rec.func(*args, **kwargs)
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.grad_fn is not None]
        flops = 0
        if outs:
            # Only the op's main output carries a gradient in a training step (the others, such as an
            # attention kernel's log-sum-exp, feed nothing differentiable).
            with FlopCounterMode(display=False) as counter:
                torch.autograd.grad(outs[0], inputs, torch.empty_like(outs[0]), allow_unused=True)
            flops = int(counter.get_total_flops())
    _BACKWARD_CACHE[key] = flops
    return flops


@contextmanager
def _fake_parameters(model: nn.Module, fake_mode: FakeTensorMode) -> Iterator[dict[int, nn.Parameter]]:
    """Swap every parameter and buffer for a fake twin (parameters requiring grad); restore on exit.

    Yields a map from the id of each original parameter to its twin. Tied parameters stay tied.
    """
    twins: dict[int, Any] = {}
    swapped: list[tuple[dict, str, Any]] = []
    try:
        for module in model.modules():
            for table, is_param in ((module._parameters, True), (module._buffers, False)):
                for name, value in list(table.items()):
                    if value is None:
                        continue
                    if id(value) not in twins:
                        # FLOPs do not depend on the dtype: every floating tensor is traced in float32 (a run
                        # in precision bf16 holds some in bf16, and runs them under autocast).
                        dtype = torch.float32 if value.is_floating_point() else value.dtype
                        with fake_mode:
                            fake = torch.empty_strided(value.shape, value.stride(), dtype=dtype)
                        twins[id(value)] = nn.Parameter(fake, requires_grad=True) if is_param else fake
                    swapped.append((table, name, value))
                    table[name] = twins[id(value)]
        yield twins
    finally:
        for table, name, value in swapped:
            table[name] = value


def _configs(model: nn.Module) -> list[Any]:
    found = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and config not in found:
            found.append(config)
    for config in list(found):
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation") and sub not in found:
                found.append(sub)
    return found


def attention_of(model: nn.Module) -> tuple[str | None, ...]:
    """The attention implementation of each of the model's configs ("eager", "sdpa", ...), top one first: what
    a forward of the model runs, and so what its profile counts."""
    return tuple(c._attn_implementation for c in _configs(model))


@contextmanager
def attention_implementation(model: nn.Module, implementation: str | None) -> Iterator[None]:
    """Run the model with ``implementation`` ("eager" or "sdpa") inside the block; None: as configured.

    Sets every config's ``_attn_implementation`` (the model's and its sub-models'), restored on exit. It does
    not check that the architecture supports it: load the model with it for that
    (``from_pretrained(attn_implementation=...)``, as ``greencore.train`` does)."""
    configs = _configs(model) if implementation is not None else []
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = implementation
        yield
    finally:
        for c, impl in zip(configs, saved, strict=True):
            c._attn_implementation = impl


def eager_attention(model: nn.Module) -> AbstractContextManager[None]:
    """Run the model with eager attention inside the block."""
    return attention_implementation(model, "eager")


def checkpointable_layers(model: nn.Module) -> list[nn.Module]:
    """The layers transformers can checkpoint (``GradientCheckpointingLayer``: transformer blocks)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Checkpoint every transformer layer of ``model`` in training (``torch.utils.checkpoint``, non-reentrant:
    a layer keeps its inputs, and its whole forward runs again when backward reaches it), or none. Raises
    ProfileError when the model has no layer transformers can checkpoint.

    Early stop is off: torch would otherwise end a layer's recompute at the last tensor the forward saved,
    which skips the layer's last matmul in some architectures (Llama's down projection, not GPT-2's) and
    depends on which tensors each op saved for the trained set; the whole forward again is the rule the
    profile counts exactly, for any architecture and any selection."""
    layers = checkpointable_layers(model)
    if enabled and not layers:
        raise ProfileError(f"{type(model).__name__} has no layer that gradient checkpointing can wrap")
    run = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False, early_stop=False)
    for layer in layers:
        layer.gradient_checkpointing = enabled
        if enabled:
            layer._gradient_checkpointing_func = run


@contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool | None) -> Iterator[None]:
    """Inside the block, checkpoint every transformer layer (True) or none (False); None: as the model is."""
    if enabled is None:
        yield
        return
    keys = ("gradient_checkpointing", "_gradient_checkpointing_func")
    layers = checkpointable_layers(model)
    saved = [{k: layer.__dict__[k] for k in keys if k in layer.__dict__} for layer in layers]
    try:
        set_gradient_checkpointing(model, enabled)
        yield
    finally:
        for layer, attrs in zip(layers, saved, strict=True):
            for k in keys:
                layer.__dict__.pop(k, None)
            layer.__dict__.update(attrs)


def checkpointing_of(model: nn.Module) -> bool:
    """Whether ``model`` checkpoints its transformer layers in training."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in checkpointable_layers(model))


def _accepts(model: nn.Module, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def step_inputs(model: nn.Module, batch_size: int, seq_len: int, target_len: int | None, device: Any) -> dict:
    """The keyword arguments of one forward of ``model`` on a batch of this shape (token ids all zero)."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    # An all-ones attention mask, as a padded training batch has (some models take other ops without one).
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        tgt = torch.zeros(batch_size, target_len or seq_len, dtype=torch.long, device=device)
        inputs["decoder_input_ids"] = tgt
        inputs["decoder_attention_mask"] = torch.ones_like(tgt)
    if _accepts(model, "use_cache") and getattr(config, "use_cache", None) is not None:
        inputs["use_cache"] = False
    return inputs


def input_embedding_modules(model: nn.Module) -> list[nn.Module]:
    """Every module that looks token ids up in the model's input embedding matrix.

    Encoder-decoders such as T5 call it through separate encoder and decoder modules sharing one weight.
    """
    try:
        embeddings = model.get_input_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError):
        return []
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        return [embeddings]
    return [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is weight] or [embeddings]


def measure_step_flops(
    model: nn.Module, batch: dict, trainable: Iterable[str] | None = None, attention: str | None = None
) -> int:
    """FlopCounterMode's count of one real forward+backward of ``model`` on ``batch``.

    ``trainable``: the parameter names that require grad during the step (default: as the model has them);
    the model's flags are restored afterwards, and gradients are cleared. ``attention``: the implementation
    to run ("eager", "sdpa"; default: the model's own). The batch must yield ``.loss``.
    """
    params = list(model.named_parameters())
    saved = [p.requires_grad for _, p in params]
    if trainable is not None:
        keep = set(trainable)
        for name, param in params:
            param.requires_grad_(name in keep)
    try:
        with (
            torch.enable_grad(),
            attention_implementation(model, attention),
            FlopCounterMode(display=False) as counter,
        ):
            loss = model(**batch).loss
            if loss.requires_grad:
                loss.backward()
        return int(counter.get_total_flops())
    finally:
        model.zero_grad(set_to_none=True)
        for (_, param), requires_grad in zip(params, saved, strict=True):
            param.requires_grad_(requires_grad)


def _output_tensor(out: Any) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ProfileError(f"cannot find logits in the output of {type(out).__name__}")


def _ratio_at_least(part: int, whole: int) -> float:
    """``part / whole`` as the smallest float ``r`` with ``r * whole >= part``, so that a budget of
    ``rho_min * full`` really pays for the cheapest step despite rounding."""
    ratio = part / whole
    while ratio * whole < part or Fraction(ratio) * whole < part:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


class TensorProfile:
    """The cost model of one training step of a model at one batch shape.

    ``names``: the trainable tensors in model order (a tied weight once; parameters the loss does not depend
    on are left out). ``step_flops(mask)`` gives the FLOPs of one step with exactly the masked tensors
    trainable. Activation-gradient and weight-gradient costs are kept as ``(upstream, flops)`` terms, where
    ``upstream`` is a bit set over ``names``: the term is paid when any tensor in it is trainable.
    """

    def __init__(
        self,
        names: tuple[str, ...],
        fwd: int,
        act_terms: dict[int, int],
        weight_terms: dict[int, int],
        batch_size: int,
        seq_len: int,
        target_len: int | None,
        exact: bool = True,
    ) -> None:
        self.names = names
        self.fwd = fwd
        # Terms sorted by upstream set; zero-cost terms are dropped.
        self.act_terms: tuple[tuple[int, int], ...] = tuple(sorted((u, c) for u, c in act_terms.items() if c))
        self.weight_terms: tuple[tuple[int, int], ...] = tuple(
            sorted((u, c) for u, c in weight_terms.items() if c)
        )
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.target_len = target_len
        self.exact = exact
        self._index = {n: i for i, n in enumerate(names)}
        self._all = (1 << len(names)) - 1
        self.full = self.step_flops_bits(self._all)
        singles = [self.step_flops_bits(1 << i).total for i in range(len(names))]
        self.rho_min = _ratio_at_least(min(singles), self.full.total) if singles else 1.0

    def __len__(self) -> int:
        return len(self.names)

    def bits(self, mask: Mask) -> int:
        """A mask (bools aligned with ``names``, or tensor names) as an int bit set."""
        if isinstance(mask, int):
            return mask
        items = list(mask)
        if not items:  # no tensor names (e.g. a selection that found nothing worth training): nothing trains
            return 0
        if isinstance(items[0], str):
            unknown = [n for n in items if n not in self._index]
            if unknown:
                raise KeyError(f"not a trainable tensor of this model: {unknown[:3]}")
            return sum(1 << self._index[n] for n in set(items))
        if len(items) != len(self.names):
            raise ValueError(f"mask has {len(items)} entries, the model {len(self.names)} tensors")
        return sum(1 << i for i, on in enumerate(items) if on)

    def step_flops_bits(self, bits: int) -> StepFlops:
        act = sum(c for u, c in self.act_terms if u & bits)
        weight = sum(c for u, c in self.weight_terms if u & bits)
        return StepFlops(self.fwd, act, weight)

    def step_flops(self, mask: Mask) -> StepFlops:
        """FLOPs of one training step (forward + backward) with exactly the masked tensors trainable."""
        return self.step_flops_bits(self.bits(mask))

    def tensor_flops(self, name: str) -> StepFlops:
        """One step in which only ``name`` trains: its weight gradient and the activation gradients to reach
        it."""
        return self.step_flops_bits(1 << self._index[name])

    @classmethod
    def combine(cls, parts: Iterable[tuple[TensorProfile, int]]) -> TensorProfile:
        """The profile of a sequence of steps: ``count`` steps of each part's shape, summed.

        Used to budget an epoch whose batches have different shapes: ``combine(...).step_flops(mask)`` is the
        FLOPs of all those steps with that mask. The parts must profile the same model (same ``names``).
        """
        parts = [(p, n) for p, n in parts if n]
        if not parts:
            raise ValueError("combine needs at least one profile with a positive count")
        names = parts[0][0].names
        fwd = 0
        act: dict[int, int] = {}
        weight: dict[int, int] = {}
        for profile, count in parts:
            if profile.names != names:
                raise ValueError("profiles of different models cannot be combined")
            fwd += profile.fwd * count
            for table, terms in ((act, profile.act_terms), (weight, profile.weight_terms)):
                for bits, flops in terms:
                    table[bits] = table.get(bits, 0) + flops * count
        first = parts[0][0]
        return cls(
            names,
            fwd,
            act,
            weight,
            first.batch_size,
            first.seq_len,
            first.target_len,
            all(p.exact for p, _ in parts),
        )

    def __repr__(self) -> str:
        return (
            f"TensorProfile({len(self.names)} tensors, batch {self.batch_size} x {self.seq_len}, "
            f"full {self.full.total:.3e} FLOPs, rho_min {self.rho_min:.3f})"
        )


def _upstream_bits(roots: Iterable[Any], leaf_bit: dict[int, int]) -> dict[Any, int]:
    """Bit set of the leaves (parameters, data marker) upstream of each autograd node reachable from roots."""
    memo: dict[Any, int] = {}
    for root in roots:
        if root in memo:
            continue
        stack: list[tuple[Any, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in memo:
                continue
            children = [n for n, _ in node.next_functions if n is not None]
            if not expanded:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in memo)
                continue
            bits = 0
            variable = getattr(node, "variable", None)
            if variable is not None:
                bits |= leaf_bit.get(id(variable), 0)
            for child in children:
                bits |= memo.get(child, 0)
            memo[node] = bits
    return memo


def profile_model(
    model: nn.Module,
    batch_size: int = 4,
    seq_len: int = 512,
    target_len: int | None = None,
    attention: str | None = None,
) -> TensorProfile:
    """Profile one training step of ``model`` on ``batch_size`` sequences of ``seq_len`` tokens.

    The model can hold real weights (on any device) or live on the meta device; it is traced on fake tensors
    and left exactly as it was. ``target_len`` is the decoder length of encoder-decoder models (default
    ``seq_len``). Attention is counted as the implementation the step runs: ``attention`` ("eager", "sdpa"),
    by default the model's own (:func:`attention_of`). Returns a :class:`TensorProfile`; FLOPs are
    FlopCounterMode's (a multiply-add is 2), CPU SDPA included (``greencore.flops``).
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError("batch_size and seq_len must be positive")
    named = list(model.named_parameters())  # tied weights appear once
    was_training = model.training
    recorder = _Recorder()
    data_leaves: list[torch.Tensor] = []

    def mark_data(_module, _args, output):
        # The data marker: a zero leaf added to the input embeddings' output, so that every tensor depending
        # on the data has it upstream. Adds cost nothing in FlopCounterMode.
        leaf = torch.zeros_like(output, requires_grad=True)
        data_leaves.append(leaf)
        return output + leaf

    embeddings = input_embedding_modules(model)

    # Checkpointed layers: each one's forward runs again in backward when backward enters it (when a tensor in
    # it or upstream of its inputs trains): a term of its forward FLOPs over those tensors. Module hooks run
    # outside the checkpoint (transformers checkpoints ``forward``), once per layer.
    regions: list[tuple[int, list[Any], list[nn.Parameter]]] = []  # (forward FLOPs, input sources, params)
    opened: list[tuple[int, list[Any]]] = []
    counting: list[FlopCounterMode] = []

    def region_start(module, args, kwargs):
        if opened:
            raise ProfileError(f"nested checkpointed layers ({type(module).__name__}) are not supported")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        sources = [t.grad_fn if t.grad_fn is not None else t for t in tensors if t.requires_grad]
        opened.append((counting[0].get_total_flops(), sources))

    def region_end(module, args, kwargs, output):
        start, sources = opened.pop()
        regions.append((counting[0].get_total_flops() - start, sources, list(module.parameters())))

    checkpointed = [m for m in checkpointable_layers(model) if m.gradient_checkpointing is True]

    # Fake tensors carry shapes, strides and autograd history but no data; Hugging Face models skip their
    # data-dependent checks (padding inspection and the like) on them, as they do under torch.export.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with _fake_parameters(model, fake_mode) as twins, attention_implementation(model, attention):
        hooks = [module.register_forward_hook(mark_data) for module in embeddings]
        for layer in checkpointed:
            hooks.append(layer.register_forward_pre_hook(region_start, with_kwargs=True))
            hooks.append(layer.register_forward_hook(region_end, with_kwargs=True))
        try:
            model.train()
            with fake_mode:
                inputs = step_inputs(model, batch_size, seq_len, target_len, "cpu")
            with torch.enable_grad(), fake_mode, FlopCounterMode(display=False) as counter:
                counting.append(counter)
                with recorder:
                    out = model(**inputs)
                    recorder.resolve()
            fwd = int(counter.get_total_flops())
            with fake_mode:
                loss = _output_tensor(out).float().sum()
        except Exception as exc:  # any failure of a foreign forward is reported the same way
            raise ProfileError(f"tracing {type(model).__name__} with fake tensors failed: {exc}") from exc
        finally:
            for hook in hooks:
                hook.remove()
            model.train(was_training)

        leaf_bit = {id(twins[id(p)]): 1 << i for i, (_, p) in enumerate(named)}
        data_bit = 1 << len(named)
        for leaf in data_leaves:
            leaf_bit[id(leaf)] = data_bit
        if loss.grad_fn is None:
            raise ProfileError("the loss does not depend on any parameter")
        upstream = _upstream_bits([loss.grad_fn], leaf_bit)  # keys: every node backward will run

        def source_bits(src: Any) -> int:
            return upstream.get(src, 0) if not isinstance(src, torch.Tensor) else leaf_bit.get(id(src), 0)

        act: dict[int, int] = {}
        weight: dict[int, int] = {}
        exact = True
        for rec in recorder.records:
            if rec.node is None or rec.node not in upstream:
                continue  # its output does not reach the loss: backward never runs it
            positions = tuple(i for i, src in rec.sources.items() if source_bits(src))
            terms, op_exact = _input_costs(rec, positions)
            exact = exact and op_exact
            for group, flops in terms:
                bits = 0
                for i in group:
                    bits |= source_bits(rec.sources[i])
                table = act if bits & data_bit else weight
                key = bits & ~data_bit
                table[key] = table.get(key, 0) + flops

        for flops, sources, params in regions:
            bits = 0
            for src in sources:
                bits |= source_bits(src)
            for p in params:
                bits |= leaf_bit.get(id(p), 0)
            table = act if bits & data_bit else weight
            key = bits & ~data_bit
            table[key] = table.get(key, 0) + flops

        used = upstream[loss.grad_fn] & ~data_bit
    kept = [i for i in range(len(named)) if used >> i & 1]
    remap = {old: new for new, old in enumerate(kept)}

    def compact(table: dict[int, int]) -> dict[int, int]:
        result: dict[int, int] = {}
        for bits, flops in table.items():
            new = 0
            for old, idx in remap.items():
                if bits >> old & 1:
                    new |= 1 << idx
            result[new] = result.get(new, 0) + flops
        return result

    names = tuple(named[i][0] for i in kept)
    return TensorProfile(names, fwd, compact(act), compact(weight), batch_size, seq_len, target_len, exact)


def _subsets(positions: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    for r in range(1, len(positions) + 1):
        yield from itertools.combinations(positions, r)


def _input_costs(
    rec: _OpRecord, positions: tuple[int, ...]
) -> tuple[list[tuple[tuple[int, ...], int]], bool]:
    """Backward cost terms of one op, ``[(inputs, flops)]`` (paid when any of ``inputs`` needs a gradient),
    and whether they are exact.

    Matmuls and convolutions cost the sum of their inputs' gradients: one term per input. A fused kernel that
    computes all its input gradients in one op costs the same whichever are needed: one term over all of
    them. Anything else is charged its dearest cost whenever any input needs a gradient (an upper bound,
    flagged as not exact).
    """
    if not positions:
        return [], True
    singles = [((i,), _backward_flops(rec, (i,))) for i in positions]
    if len(positions) == 1 or _backward_flops(rec, positions) == sum(c for _, c in singles):
        return singles, True
    costs = [_backward_flops(rec, s) for s in _subsets(positions)]
    return [(positions, max(costs))], len(set(costs)) == 1
