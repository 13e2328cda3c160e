"""Peak memory of a run, known before it runs: one training step and one importance evaluation, replayed on
fake tensors (shapes, no data, nothing allocated) under a tracker of live storages.

What is replayed is what ``greencore.train`` runs, step for step: the model in train mode (with the attention
implementation of ``hyperparameters.attention``, as the run loads it), ``model(**batch).loss``,
``loss.backward()``, ``clip_grad_norm_`` over the parameters holding a gradient, ``AdamW(lr,
weight_decay).step()`` (fused on CUDA, as the run builds it there) and ``zero_grad(set_to_none=True)``; the
optimizer already holds its two moments for every trained tensor (the steady state after the first step). The
importance evaluation calls ``greencore.importance.importance_pass`` itself, on the fake model, with the
training optimizer's tentative copy. So the peak counts every tensor: the weights and buffers, gradients and
AdamW's moments of the trained tensors only, the activations autograd saves for backward (which depend on what
trains: nothing is saved below the deepest trainable tensor, the inputs needing no gradient), and the
transients of forward, backward and the optimizer step.

The tracker (:class:`LiveStorages`) counts storages as they appear in dispatched ops and lets them go when
Python frees them, the way the allocator sees a step, without allocator rounding or a kernel's internal
scratch buffers. It measures a real run the same way (tests, ``bench/memory.py``).

Precision and micro-batches are replayed as the run has them: each fake twin is made in the dtype the run
holds that tensor in (``greencore.precision.tensor_dtypes``: bf16 for frozen matrices under precision bf16),
forwards run under the run's autocast, and a step runs two micro-batches (the second one's backward
accumulates into the first one's gradients, the step's steady state) of ``micro_batch_size`` rows cut from the
whole batch, which the run holds on its device. With ``gradient_checkpointing`` the replayed step checkpoints
the layers as the run does (each layer keeps its inputs; its forward runs again in backward). Host memory the
run keeps beside the device (precision bf16's float32 originals of a float32 base) is not device memory and is
not counted.

On several ranks the replay is rank 0's (the rank with the most rows): the run's own engine runs over a fake
process group of that size (:func:`fake_world`): DDP's wrapper with its gradient buckets, or FSDP2's sharding
(``greencore.sharded.shard``: each rank's shards, the layers gathered and freed, gradients reduce-scattered),
on the rank's rows of each batch.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from greencore.distributed import Ranks, local, wrap
from greencore.models import TRACE_LOCK
from greencore.precision import HeldPrecision, Precision, autocast, resolve_precision, tensor_dtypes
from greencore.spec import AUTO, Distributed, Hyperparameters

if TYPE_CHECKING:  # FSDP2 stays out of `import greencore`
    from greencore.sharded import Sharded

Shape = tuple[int, ...]  # a padded batch: (batch, seq) or, for seq2seq, (batch, seq, target)
GIB = 1 << 30


class InsufficientMemory(RuntimeError):
    """A run's estimated peak memory exceeds the memory of the device it would run on."""

    def __init__(self, peak_bytes: int, device_bytes: int, device: str) -> None:
        self.peak_bytes = peak_bytes
        self.device_bytes = device_bytes
        super().__init__(
            f"the job needs {peak_bytes} bytes ({peak_bytes / GIB:.2f} GiB) of memory at its peak, and "
            f"{device} has {device_bytes} bytes ({device_bytes / GIB:.2f} GiB): use a smaller batch_size or "
            "max_seq_len, a smaller rho, or a device with more memory"
        )


@dataclass(frozen=True)
class PeakMemory:
    """Peak bytes of a run's two phases (0 for a phase the run does not have)."""

    train_step_bytes: int  # one training step (forward, backward, clip, optimizer step)
    importance_bytes: int  # one importance evaluation (green's two passes and tentative step)

    @property
    def peak_bytes(self) -> int:
        return max(self.train_step_bytes, self.importance_bytes)


_HOST = threading.local()


@contextlib.contextmanager
def host_memory() -> Iterator[None]:
    """Allocations inside the block are host memory, off the device (``greencore.importance`` keeps its saved
    copies there on CUDA): a :class:`LiveStorages` tracker does not count them."""
    saved = getattr(_HOST, "on", False)
    _HOST.on = True
    try:
        yield
    finally:
        _HOST.on = saved


class LiveStorages(TorchDispatchMode):
    """Bytes of the storages alive, and their peak: every storage an op returns counts from then until Python
    frees it (views of one storage count once), at its current size: a storage resized in place (FSDP2 frees
    a gathered parameter by resizing its storage to 0 bytes and gathers it again into the same storage) counts
    what it holds after each resize. Storages that existed before (weights, optimizer state) are added with
    :meth:`add`. ``fake_scalars``: answer a read of a tensor's value (``.item()``, ``float(t)``) with 1
    (True), so code that reads a loss or a step count runs on fake tensors."""

    def __init__(self, fake_scalars: bool = False) -> None:
        super().__init__()
        self.fake_scalars = fake_scalars
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, Any] = {}
        self._bytes: dict[int, int] = {}
        self._thread: int | None = None  # the thread the tracker was entered in (its resizes are its own)

    def add(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            # A DTensor (FSDP2's parameters, gradients and AdamW state) holds its rank's shard: that is
            # what is allocated (the wrapper's own storage has the whole tensor's size and holds nothing).
            self._count(local(t).untyped_storage())

    def _count(self, storage: torch.UntypedStorage) -> None:
        """Count ``storage`` at its size now (first seen: from now on, until it is freed)."""
        key = storage._cdata
        nbytes = storage.nbytes()
        if key not in self._live:
            self._live[key] = weakref.finalize(storage, self._freed, key)
            self._bytes[key] = 0
        self.live_bytes += nbytes - self._bytes[key]
        self._bytes[key] = nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _freed(self, key: int) -> None:
        if self._live.pop(key, None) is not None:
            self.live_bytes -= self._bytes.pop(key)

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def __enter__(self):
        self._thread = threading.get_ident()
        _RESIZE_WATCHERS.append(self)
        torch.UntypedStorage.resize_ = _watched_resize  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc):
        _RESIZE_WATCHERS.remove(self)
        if not _RESIZE_WATCHERS:
            torch.UntypedStorage.resize_ = _STORAGE_RESIZE  # type: ignore[method-assign]
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake_scalars and func is torch.ops.aten._local_scalar_dense.default:
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        if not getattr(_HOST, "on", False):
            self.add(o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor))
        return out


_STORAGE_RESIZE = torch.UntypedStorage.resize_
_RESIZE_WATCHERS: list[LiveStorages] = []  # the trackers in force: they see a storage resized in place


def _watched_resize(storage: torch.UntypedStorage, size: int) -> Any:
    """``UntypedStorage.resize_`` while a :class:`LiveStorages` tracks: a direct call, not a dispatched op."""
    out = _STORAGE_RESIZE(storage, size)
    if not getattr(_HOST, "on", False):
        for tracker in _RESIZE_WATCHERS:
            if tracker._thread == threading.get_ident():
                tracker._count(storage)
    return out


def peak_shapes(shapes: Iterable[Shape]) -> list[Shape]:
    """The distinct shapes no other shape covers in every dimension: the peak is at one of them."""
    distinct = sorted(set(shapes), reverse=True)
    return [
        s
        for s in distinct
        if not any(
            o != s and len(o) == len(s) and all(a >= b for a, b in zip(o, s, strict=True)) for o in distinct
        )
    ]


def fake_batch(task: str, shape: Shape, device: str) -> dict[str, torch.Tensor]:
    """A batch of ``shape`` as ``greencore.data.collate`` builds it (call it under a FakeTensorMode)."""
    ids = torch.zeros(shape[:2], dtype=torch.long, device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "classification":
        batch["labels"] = torch.zeros(shape[0], dtype=torch.long, device=device)
    else:
        batch["labels"] = torch.zeros((shape[0], shape[-1]), dtype=torch.long, device=device)
    return batch


def _placed(device: str) -> str:
    """Where the fake tensors of a replay for ``device`` live: fake CUDA tensors still reach CUDA's runtime
    (an embedding aborts the process on a build without CUDA), so without one the replay for CUDA runs on CPU
    fake tensors with what makes it CUDA's: the model's own attention (CPU SDPA keeps what CUDA's fused
    kernels keep: the output and the log-sum-exp) and fused AdamW."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return "cpu"
    return device


def _fake_model(
    model: nn.Module,
    mode: FakeTensorMode,
    device: str,
    trainable: set[str],
    dtypes: dict[str, torch.dtype] | None = None,
) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake twins on ``device`` (tied ones stay tied),
    each floating parameter in its dtype in ``dtypes`` (by name; default its own); exactly the parameters
    named in ``trainable`` require a gradient."""
    with TRACE_LOCK:
        fake = copy.deepcopy(model)
    names = {id(p): n for n, p in fake.named_parameters()}
    twins: dict[int, torch.Tensor] = {}
    for module in fake.modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for key, value in list(table.items()):
                if value is None:
                    continue
                if id(value) not in twins:
                    dtype = value.dtype
                    if is_param and dtypes is not None and value.is_floating_point():
                        dtype = dtypes.get(names.get(id(value), ""), dtype)
                    with mode:
                        twin = torch.empty_strided(
                            value.shape, value.stride(), dtype=dtype, device=_placed(device)
                        )
                    if is_param:
                        twin = nn.Parameter(twin, requires_grad=names.get(id(value)) in trainable)
                    twins[id(value)] = twin
                table[key] = twins[id(value)]
    _with_pad_token(fake)
    return fake


def _with_pad_token(model: nn.Module) -> None:
    """A pad token id where the config has none, as train sets one for a tokenizer's padding (classifiers
    need one)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", 0) is None:
        config.pad_token_id = 0


def _with_rate(hp: Hyperparameters) -> Hyperparameters:
    """``hp`` with a number for a learning rate left "auto": an optimizer needs one, and its value changes no
    tensor's size."""
    return replace(hp, learning_rate=1e-3) if hp.learning_rate == AUTO else hp


def warm_optimizer(
    trained: list[nn.Parameter], hp: Hyperparameters, device: str = "cpu"
) -> torch.optim.Optimizer | None:
    """The training run's AdamW over ``trained`` (real or fake tensors; ``greencore.importance.
    training_optimizer`` for ``device``), already holding its moments: the steady state after step one. None
    when nothing trains."""
    from greencore.importance import training_optimizer

    if not trained:
        return None
    optimizer = training_optimizer(trained, _with_rate(hp), torch.device(device).type)
    for p in trained:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _held(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    states = optimizer.state.values() if optimizer is not None else []
    state = [v for s in states for v in s.values() if isinstance(v, torch.Tensor)]
    return [*model.parameters(), *model.buffers(), *state]


def _attention(model: nn.Module, hp: Hyperparameters) -> contextlib.AbstractContextManager[None]:
    from greencore.profile import attention_implementation

    # What train runs: the implementation ``hp.attention`` names, or the model's own (auto).
    return attention_implementation(model, None if hp.attention == "auto" else str(hp.attention))


def _precision(hp: Hyperparameters, device: str) -> Precision:
    return resolve_precision(hp, torch.device(device).type)


def _dtypes(model: nn.Module, trained: Iterable[str], precision: Precision) -> dict[str, torch.dtype]:
    return tensor_dtypes(model.named_parameters(), trained, precision)


def _micro_batches(batch: dict[str, torch.Tensor], hp: Hyperparameters) -> list[dict[str, torch.Tensor]]:
    """The first two micro-batches of ``batch`` (views of it), as the run cuts them; the whole batch when it
    is one."""
    rows = batch["input_ids"].shape[0]
    size = hp.micro_batch_size
    if size is None or size >= rows:
        return [batch]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, min(rows, 2 * size), size)]


def train_step_bytes(
    model: nn.Module,
    trained: Iterable[str],
    shape: Shape,
    task: str,
    hp: Hyperparameters,
    device: str = "cpu",
    world: int = 1,
) -> int:
    """Peak bytes of one training step of ``model`` (real or meta; left unchanged) on a batch of ``shape``
    with exactly the parameters named in ``trained`` trainable, on ``device`` ("cpu" or "cuda"), in the
    run's precision and micro-batches (``hp``). On ``world`` ranks, the peak of one rank's device (rank 0's,
    the largest): the engine ``hp.distributed`` names runs over a fake process group (:func:`fake_world`)."""
    trained = set(trained)
    precision = _precision(hp, device)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = LiveStorages()
    with fake_world(world) as ranks:
        fake, sharded = _replica(model, mode, device, trained, precision, hp, ranks)
        params = [p for p in fake.parameters() if p.requires_grad]
        with mode, _attention(fake, hp), TRACE_LOCK:
            optimizer = warm_optimizer(params, hp, device)
            batch = fake_batch(task, shape, _placed(device))
            tracker.add([*_held(fake, optimizer), *batch.values()])
            if optimizer is None:  # nothing trains: the run takes no step
                return tracker.peak_bytes
            fake.train()
            parts = _micro_batches(batch if ranks is None else ranks.shard(batch), hp)
            with tracker, torch.enable_grad():
                # DDP is built when the epoch's choice is known, its gradient buckets then held by the steps.
                forward = wrap(fake, ranks) if ranks is not None and sharded is None else fake
                for i, part in enumerate(parts):
                    last = i == len(parts) - 1
                    if sharded is not None:
                        sharded.set_gradient_sync(last)
                    ddp_waits = forward is not fake and not last  # DDP all-reduces after the last part only
                    with forward.no_sync() if ddp_waits else contextlib.nullcontext():
                        with autocast(precision, torch.device(_placed(device)).type):
                            loss = forward(**part).loss
                        if loss.requires_grad:
                            (loss if len(parts) == 1 else loss * 0.5).backward()
                if hp.max_grad_norm is not None:
                    grads = [p for p in params if p.grad is not None]
                    torch.nn.utils.clip_grad_norm_(grads, hp.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return tracker.peak_bytes


def importance_bytes(
    model: nn.Module,
    candidates: Iterable[str],
    held_state: Iterable[str],
    shape: Shape,
    task: str,
    hp: Hyperparameters,
    device: str = "cpu",
    world: int = 1,
) -> int:
    """Peak bytes of one importance evaluation (``importance_pass``) of ``candidates`` on a batch of
    ``shape``, while the training optimizer holds AdamW state for the parameters named in ``held_state``. On
    ``world`` ranks: under DDP rank 0 evaluates the whole batch alone (one process's peak); sharded (FSDP2)
    every rank evaluates its rows on its shards."""
    from greencore.importance import importance_pass, tentative_optimizer_factory

    candidates = list(candidates)
    held = set(held_state) | set(candidates)
    precision = _precision(hp, device)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = LiveStorages(fake_scalars=True)
    with fake_world(world if hp.distributed == Distributed.FSDP else 1) as ranks:
        # Tensors trained before are float32 (precision bf16); the candidates not among them are widened for
        # the evaluation only, as GreenMethod.choose does.
        fake, sharded = _replica(model, mode, device, held, precision, hp, ranks, dtyped=set(held_state))
        state_of = [p for n, p in fake.named_parameters() if n in set(held_state)]
        with mode, _attention(fake, hp), TRACE_LOCK:
            training = warm_optimizer(state_of, hp, device) or torch.optim.AdamW(
                [nn.Parameter(torch.empty(0, device=_placed(device)))],
                lr=_with_rate(hp).learning_rate,
                weight_decay=hp.weight_decay,
            )
            batch = fake_batch(task, shape, _placed(device))
            tracker.add([*_held(fake, training), *batch.values()])
            fake.train()
            parts = _micro_batches(batch if ranks is None else ranks.shard(batch), hp)
            weights = [1.0 / len(parts)] * len(parts)
            if sharded is not None:
                sharded.set_trained(None)  # as the run: the candidates may reach any layer
            with tracker, HeldPrecision(fake, precision).widened(candidates):
                importance_pass(
                    fake,
                    parts,
                    tentative_optimizer_factory(training),
                    names=candidates,
                    weights=weights,
                    autocast=autocast(precision, torch.device(_placed(device)).type),
                    offload=sharded is None,  # as the run: copies in host memory, or a spill file on a CPU
                    sum_over_ranks=ranks.sum if sharded is not None else None,
                )
    return tracker.peak_bytes


@contextlib.contextmanager
def fake_world(world: int) -> Iterator[Ranks | None]:
    """Rank 0 of ``world`` ranks over a fake process group (torch's ``fake`` backend: every collective
    returns at once, moving nothing), for a replay on fake tensors of what a rank holds; None for one
    process. The group is this process's default one while the block runs (under :data:`TRACE_LOCK`), so
    this runs only where no process group is initialised (an estimate is made outside a run's ranks)."""
    if world <= 1:
        yield None
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    with TRACE_LOCK:
        if dist.is_initialized():
            raise RuntimeError("a replay on several ranks runs outside an initialised process group")
        dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
        try:
            yield Ranks(0, world, 0, torch.device("cpu"))
        finally:
            dist.destroy_process_group()


def _replica(
    model: nn.Module,
    mode: FakeTensorMode,
    device: str,
    trainable: set[str],
    precision: Precision,
    hp: Hyperparameters,
    ranks: Ranks | None,
    dtyped: set[str] | None = None,
) -> tuple[nn.Module, Sharded | None]:
    """The fake model a rank replays: :func:`_fake_model` (each tensor in its dtype for ``precision``, the
    parameters named in ``dtyped`` taken as trained there; default ``trainable``), gradient checkpointing as
    ``hp`` has it, and, sharded (``hp.distributed`` fsdp on ``ranks``), wrapped by ``greencore.sharded.shard``
    as the run wraps it, each rank's shards made fake tensors; its :class:`Sharded` then, else None."""
    from greencore.profile import set_gradient_checkpointing

    dtypes = _dtypes(model, trainable if dtyped is None else dtyped, precision)
    if ranks is None or hp.distributed != Distributed.FSDP:
        fake = _fake_model(model, mode, device, trainable, dtypes)
        if hp.gradient_checkpointing:
            set_gradient_checkpointing(fake, True)
        return fake, None
    from greencore.sharded import shard

    # FSDP2 shards a model on the meta device; its shards then become fake tensors (precision bf16 is refused
    # under fsdp, so every tensor keeps its dtype).
    with TRACE_LOCK:
        meta = copy.deepcopy(model).to("meta")
    for name, p in meta.named_parameters():
        p.requires_grad_(name in trainable)
    if hp.gradient_checkpointing:
        set_gradient_checkpointing(meta, True)
    sharded = shard(meta, ranks)
    with mode:
        meta.to_empty(device=_placed(device))
    _with_pad_token(meta)
    sharded.set_trained(trainable)
    return meta, sharded


@dataclass(frozen=True)
class MemoryPlan:
    """What a method's run holds, for its peak memory (``Method.memory_plan``): the model it trains (on the
    meta device, wrapped as the method wraps it), the parameters that train, and the candidates of its
    importance evaluation. ``basis``: "exact" when these are the run's own; "bound" when the run's selection
    changes and is unknown before it runs, and ``trained`` is every tensor it could reach (a superset of any
    selection: more tensors trained never need less memory)."""

    model: nn.Module
    trained: tuple[str, ...]
    candidates: tuple[str, ...] = ()
    basis: str = "exact"


@dataclass
class RunShapes:
    """The batch shapes of a planned run: every step's, and the importance evaluations'."""

    task: str
    steps: list[Shape]
    importance: list[Shape]
    _cache: dict[Any, int] = field(default_factory=dict, repr=False)

    def peak(self, plan: MemoryPlan, hp: Hyperparameters, device: str = "cpu", world: int = 1) -> PeakMemory:
        """The peaks of ``plan``'s run over these shapes (each computation cached), on one of ``world``
        ranks."""
        shapes = tuple(
            (n, tuple(p.shape)) for n, p in plan.model.named_parameters() if n in set(plan.trained)
        )
        model_key = (type(plan.model).__qualname__, sum(p.numel() for p in plan.model.parameters()), shapes)
        key = (
            model_key,
            hp.max_grad_norm,
            str(hp.attention),
            hp.gradient_checkpointing,
            str(_precision(hp, device)),
            hp.micro_batch_size,
            device,
            world,
            str(hp.distributed) if world > 1 else None,
        )
        if key not in self._cache:
            self._cache[key] = max(
                (
                    train_step_bytes(plan.model, plan.trained, s, self.task, hp, device, world)
                    for s in peak_shapes(self.steps)
                ),
                default=0,
            )
        step = self._cache[key]
        imp = 0
        if plan.candidates:
            ikey = (*key, "importance", plan.candidates)
            if ikey not in self._cache:
                self._cache[ikey] = max(
                    importance_bytes(
                        plan.model, plan.candidates, plan.trained, s, self.task, hp, device, world
                    )
                    for s in peak_shapes(self.importance or self.steps)
                )
            imp = self._cache[ikey]
        return PeakMemory(step, imp)


def device_memory_bytes(device: str | None, declared_bytes: int | None) -> tuple[int, str]:
    """The memory a run on ``device`` may use, and what it is: on CUDA the device's free memory plus what this
    process's allocator holds unused (the smaller of that and ``declared_bytes`` when given); on CPU
    ``declared_bytes``, else the host's available memory."""
    kind = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if kind.type == "cuda":
        free, _total = torch.cuda.mem_get_info(kind)
        usable = free + torch.cuda.memory_reserved(kind) - torch.cuda.memory_allocated(kind)
        name = torch.cuda.get_device_name(kind)
        if declared_bytes is not None and declared_bytes < usable:
            return declared_bytes, f"{name} (GT_DEVICE_MEMORY_BYTES)"
        return usable, f"{name} (free memory)"
    if declared_bytes is not None:
        return declared_bytes, "the CPU (GT_DEVICE_MEMORY_BYTES)"
    return _host_available_bytes(), "the CPU (the host's available memory)"


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(peak_bytes: int, device: str | None, declared_bytes: int | None) -> None:
    """Raise :class:`InsufficientMemory` when ``peak_bytes`` exceeds :func:`device_memory_bytes`."""
    available, name = device_memory_bytes(device, declared_bytes)
    if peak_bytes > available:
        raise InsufficientMemory(peak_bytes, available, name)
