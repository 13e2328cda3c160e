"""The training run behind a job: ``train(spec, on_epoch, should_stop, on_step) -> TrainReport``.

One recipe for every method (``greencore.methods``) and every task (causal LM, seq2seq, classification):

    run = _setup(spec)                       data, model, method, optimizer, schedule, resume state
    for epoch in the epochs left:
        report = _train_epoch(run, epoch)    plan the batches, the method chooses the tensors, train them,
                                             measure the first step's FLOPs, validate, meter energy
        _save(run, report)                   checkpoint atomically, then hand the report to on_epoch

FLOPs are FlopCounterMode's (a multiply-add is 2). The model is loaded with the attention implementation of
``hyperparameters.attention`` (auto: transformers' choice), and the training steps, the importance passes,
validation and the profile behind the budget all run that one (CPU SDPA is counted by ``greencore.flops``).
``hyperparameters.precision`` sets the dtypes tensors are held in and the autocast every forward runs under
(``greencore.precision``); ``micro_batch_size`` splits each step's batch into micro-batches whose gradients
accumulate, each weighted by its share of the batch's loss terms, so the update is the whole batch's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from greencore import checkpoint
from greencore.data import IGNORE, DatasetError, Encoded, collate, encode_dataset, task_for, validate_dataset
from greencore.distributed import Ranks, wrap
from greencore.energy import EnergyMeter, grams_co2e
from greencore.estimate import plan_costing, run_costs
from greencore.flops import StepFlops
from greencore.importance import tentative_optimizer_factory, training_optimizer
from greencore.methods import Choice, EpochContext, FirstStep, Method, make_method
from greencore.models import ModelFolderError, load_config
from greencore.plan import EpochPlan, ShapeProfiles, plan_epoch
from greencore.precision import HeldPrecision, autocast, resolve_precision
from greencore.profile import ProfileError, set_gradient_checkpointing
from greencore.reselect import EpochCosts, run_epochs
from greencore.spec import (
    AUTO,
    Attention,
    Distributed,
    EpochReport,
    Hyperparameters,
    SpecError,
    TrainReport,
    TrainSpec,
)

if TYPE_CHECKING:  # imported when a run is sharded: FSDP2 stays out of `import greencore`
    from greencore.sharded import Sharded

__all__ = ["LossNotFinite", "auto_class", "evaluate", "linear_schedule", "train"]

OnEpoch = Callable[[EpochReport], None]
ShouldStop = Callable[[], bool]
OnStep = Callable[[int, int, int], None]
Batch = dict[str, torch.Tensor]

LOSS_CHECK_EVERY = 16  # steps between checks that the training loss is still finite


class LossNotFinite(RuntimeError):
    """The training loss became NaN or infinite: the run stops before it saves weights that are garbage."""


def auto_class(task: str) -> type:
    """The transformers Auto class that loads a model for ``task`` (imported here: `import greencore` stays
    light)."""
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "classification": transformers.AutoModelForSequenceClassification,
    }[task]


@dataclass
class TrainingState:
    """What a checkpoint's ``training_state.pt`` holds to resume a run exactly after ``epoch``."""

    fingerprint: str  # what the run was given (_fingerprint): another job's checkpoint is refused
    epoch: int
    global_step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]  # "torch", "cuda" (None on CPU)
    selection: list[str]  # the tensors the last epoch trained
    trained: list[str]  # every tensor trained so far (their saved values differ from the base)
    reports: list[dict[str, Any]]  # the EpochReports so far
    selection_details: dict[str, Any] = field(default_factory=dict)  # how the last selection was made

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainingState:
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


@dataclass
class _Hooks:
    on_epoch: OnEpoch | None
    should_stop: ShouldStop | None
    on_step: OnStep | None

    def stop(self, ranks: Ranks | None = None) -> bool:
        """Whether to stop now: asked on this process, or (several ranks) on any rank, decided together."""
        asked = self.should_stop is not None and self.should_stop()
        return ranks.any(asked) if ranks is not None else asked


@dataclass
class _Run:
    """Everything a run holds: what ``_setup`` built, and what changes epoch by epoch."""

    spec: TrainSpec
    hp: Hyperparameters
    device: torch.device
    task: str
    labels: list[str] | None
    tokenizer: Any
    train_data: Encoded
    valid_data: Encoded | None
    method: Method
    model: nn.Module
    params: list[nn.Parameter]  # what the optimizer holds
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    profiles: ShapeProfiles  # the training steps'
    importance_profiles: ShapeProfiles  # the importance passes' (in eval mode: no layer is recomputed)
    meter: EnergyMeter
    autocast: AbstractContextManager[Any]
    held: HeldPrecision  # which tensors are held in bf16 (precision bf16)
    dtypes: dict[str, torch.dtype]  # the base's dtype of each tensor, kept in checkpoints
    default_dtype: torch.dtype
    fingerprint: str
    start_epoch: int
    ranks: Ranks | None = None  # several ranks (torchrun): this process's place; None: one process
    ddp: nn.Module | None = None  # the DistributedDataParallel wrapper of the tensors training now
    sharded: Sharded | None = None  # distributed fsdp: the model's FSDP2 modules
    twin: nn.Module | None = None  # distributed fsdp: the model on the meta device (profiles, checkpoints)
    choice: Choice | None = None  # the tensors the last epoch trained
    trained: set[str] = field(default_factory=set)
    reports: list[EpochReport] = field(default_factory=list)
    last_dir: Path | None = None  # the latest checkpoint

    def batch(self, indices: list[int]) -> Batch:
        return _to(
            collate(self.train_data, indices, self.tokenizer.pad_token_id, self.hp.max_seq_len), self.device
        )

    def micro_batches(self, batch: Batch) -> list[tuple[Batch, float]]:
        return micro_batches(batch, self.task, self.hp.micro_batch_size)


def train(
    spec: TrainSpec,
    on_epoch: OnEpoch | None = None,
    should_stop: ShouldStop | None = None,
    on_step: OnStep | None = None,
) -> TrainReport:
    """Fine-tune ``spec.model_dir`` on ``spec.train_file`` with ``spec.method``; checkpoint every epoch.

    ``on_epoch(report)`` gets each EpochReport as soon as its epoch is checkpointed. ``should_stop()`` is
    asked before every step: True ends the run at once, keeping the last checkpoint (``TrainReport.stopped``).
    ``on_step(epoch, step, steps_in_epoch)`` follows progress (1-based). With ``spec.resume_from`` (an
    ``epoch-N`` folder of an earlier run of the same spec) the run continues after epoch N exactly as if it
    had never stopped; the report then holds the earlier epochs too.
    Raises SpecError, DatasetError, ModelFolderError, MethodError, CheckpointError or BudgetTooSmall on bad
    input, before anything trains.
    """
    hooks = _Hooks(on_epoch, should_stop, on_step)
    run = _setup(spec)
    leader = run.ranks is None or run.ranks.leader  # the process that writes and reports
    if not leader:
        hooks = _Hooks(None, should_stop, None)
    stopped = False
    for epoch in range(run.start_epoch, run.hp.n_epochs + 1):
        report = None if hooks.stop(run.ranks) else _train_epoch(run, epoch, hooks)
        if report is None:  # asked to stop: the last checkpoint stays the run's
            stopped = True
            break
        _save(run, report)
        if hooks.on_epoch is not None:
            hooks.on_epoch(report)
    final = None
    if not stopped and run.last_dir is not None:
        if leader:
            checkpoint.link_final(spec.output_dir, run.last_dir)
        final = str(Path(spec.output_dir) / checkpoint.FINAL_DIR)
    if run.ranks is not None:  # the wrapper goes before the process group can; every rank leaves together
        run.ddp = None
        run.ranks.barrier()
    return TrainReport(
        run.reports, final, stopped, run.task, run.method.info.name, run.method.rho, run.labels
    )


# -- setup ---------------------------------------------------------------------------------------------------


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _setup(spec: TrainSpec) -> _Run:
    """Check the spec, read the data, load the model as the method wants it, build the optimizer and schedule,
    and put back a checkpoint's state when resuming."""
    spec.check()
    ranks = Ranks.from_env(spec.device)
    device = ranks.device if ranks is not None else torch.device(spec.device or _default_device())
    config = load_config(spec.model_dir)
    tokenizer = _load_tokenizer(spec.model_dir)
    task, labels, train_data, valid_data = _setup_data(spec, config, tokenizer)
    hp = _resolve(spec, train_data, labels)
    method = make_method(spec.method, hp)

    fingerprint = _fingerprint(spec, hp)
    state = TrainingState.from_dict(checkpoint.load_state(spec.resume_from)) if spec.resume_from else None
    if state is not None and state.fingerprint != fingerprint:
        raise checkpoint.CheckpointError(
            f"{spec.resume_from} was written by a different job "
            "(model, data, method or hyperparameters differ)"
        )

    torch.manual_seed(spec.seed)
    source = method.weights_source(spec.model_dir, spec.resume_from if state is not None else None)
    model, new_modules = _load_model(source, task, labels, tokenizer, hp.attention)
    if hp.gradient_checkpointing:
        try:
            set_gradient_checkpointing(model, True)
        except ProfileError as exc:
            raise SpecError("gradient_checkpointing", str(exc)) from exc
    model, params = method.prepare(model, new_modules)
    if state is not None and spec.resume_from is not None:
        method.restore(model, spec.resume_from)  # what the checkpoint holds beyond the weights loaded
    precision = resolve_precision(hp, device.type)
    held = HeldPrecision(model, precision)
    held.narrow(keep=state.trained if state is not None else ())  # before the device holds anything
    model.to(device)
    if device.type == "cuda":  # float32 matmuls (fp32 runs, float32 parts of the others) on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    twin = sharded = None
    if ranks is not None and hp.distributed == Distributed.FSDP:
        model, params, twin, sharded = _shard(model, params, ranks)
    shape = twin or model  # what the profiles trace: the whole model
    total_steps = math.ceil(len(train_data) / hp.batch_size) * hp.n_epochs
    profiles = ShapeProfiles(shape, baseline=lambda: method.full_baseline(shape))
    optimizer = training_optimizer(params, hp, device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(hp.warmup_steps, total_steps))
    default_dtype = getattr(config, "dtype", None) or torch.float32
    default_dtype = getattr(torch, default_dtype) if isinstance(default_dtype, str) else default_dtype
    run = _Run(
        spec=spec,
        hp=hp,
        device=device,
        task=task,
        labels=labels,
        tokenizer=tokenizer,
        train_data=train_data,
        valid_data=valid_data,
        method=method,
        model=model,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        profiles=profiles,
        importance_profiles=(
            ShapeProfiles(shape, checkpointing=False) if hp.gradient_checkpointing else profiles
        ),
        meter=EnergyMeter(str(device), spec.energy),
        autocast=autocast(precision, device.type),
        held=held,
        dtypes=checkpoint.base_dtypes(spec.model_dir),
        default_dtype=default_dtype,
        fingerprint=fingerprint,
        start_epoch=1,
        last_dir=Path(spec.resume_from) if spec.resume_from else None,
        ranks=ranks,
        sharded=sharded,
        twin=twin,
    )
    if state is not None:
        _resume(run, state)
    return run


def peak_memory_bytes(spec: TrainSpec, world_size: int = 1) -> int:
    """The peak memory of ``spec``'s run on one device of ``world_size`` ranks, as its estimate gives it
    (``greencore.estimate.run_costs`` on the run's own data and plan): for a worker whose ranks are not the
    ones the job's estimate was made for. Raises BudgetTooSmall or SpecError as the estimate does."""
    tokenizer = _load_tokenizer(spec.model_dir)
    _task, labels, data, _valid = _setup_data(spec, load_config(spec.model_dir), tokenizer)
    hp = spec.hyperparameters
    device = torch.device(spec.device or _default_device()).type
    costs = run_costs(
        spec.model_dir, data, spec.method, hp, spec.seed, len(labels) if labels else None, device, world_size
    )
    memory = costs.estimate(hp, spec.energy).memory
    assert memory is not None  # run_costs always gives the memory model
    return memory.method.peak_bytes


def _shard(
    model: nn.Module, params: list[nn.Parameter], ranks: Ranks
) -> tuple[nn.Module, list[nn.Parameter], nn.Module, Sharded]:
    """``model`` (on its device) sharded with FSDP2 over ``ranks``, the optimizer's ``params`` as the sharded
    parameters that replaced them, the model's meta twin, and its FSDP modules."""
    from greencore.sharded import meta_twin, shard

    name_of = {id(p): n for n, p in model.named_parameters()}
    twin = meta_twin(model)
    sharded = shard(model, ranks)
    ranks.sharded = True
    now = dict(model.named_parameters())
    return model, [now[name_of[id(p)]] for p in params], twin, sharded


def _setup_data(
    spec: TrainSpec, config: Any, tokenizer: Any
) -> tuple[str, list[str] | None, Encoded, Encoded | None]:
    """The task, the label names (classification), and the training and validation data, tokenized."""
    hp = spec.hyperparameters
    train_summary = validate_dataset(spec.train_file)
    valid_summary = validate_dataset(spec.valid_file) if spec.valid_file else None
    if valid_summary is not None and valid_summary.format != train_summary.format:
        raise DatasetError(
            None,
            None,
            f"the validation file is {valid_summary.format}, the training file {train_summary.format}",
        )
    task = task_for(train_summary.format, config)
    labels = train_summary.labels
    label2id = {name: i for i, name in enumerate(labels)} if labels else None
    train_data = encode_dataset(train_summary, tokenizer, task, hp.max_seq_len, label2id)
    valid_data = (
        encode_dataset(valid_summary, tokenizer, task, hp.max_seq_len, label2id) if valid_summary else None
    )
    if not len(train_data):
        raise DatasetError(None, None, "no example keeps a completion token within max_seq_len")
    return task, labels, train_data, valid_data


def _resolve(spec: TrainSpec, data: Encoded, labels: list[str] | None) -> Hyperparameters:
    """The hyperparameters as the run uses them, on the run's own plan (``greencore.estimate.run_costs``, the
    estimate's rule): ``max_flops`` or ``max_energy_kwh`` converted to a rho; what a budgeted method chooses
    for itself settled (green's automatic ``reselect_every``); ``learning_rate "auto"`` the rate
    ``greencore.lr`` gives the method at the budget in force (the estimate's, the same number). A budget that
    cannot train is refused here, naming what would make it fit, before anything trains."""
    hp = spec.hyperparameters
    budget = hp.max_flops is not None or hp.max_energy_kwh is not None
    fixed_set = make_method(spec.method, hp).default_rho is None and not budget
    if fixed_set and hp.learning_rate != AUTO:
        return hp  # nothing to resolve
    costs = run_costs(spec.model_dir, data, spec.method, hp, spec.seed, len(labels) if labels else None)
    rho = costs.resolve_rho(hp, spec.energy)
    hp = costs.settled(hp, rho)
    if budget:
        hp = replace(hp, rho=rho, max_flops=None, max_energy_kwh=None)
    if hp.learning_rate == AUTO:
        hp = replace(hp, learning_rate=costs.auto_learning_rate(hp, rho).learning_rate)
    return hp


def _resume(run: _Run, state: TrainingState) -> None:
    optimizer_state = state.optimizer
    if run.sharded is not None:  # a checkpoint holds full tensors: each rank takes its shards
        from greencore.sharded import shard_optimizer_state

        held = [p for group in run.optimizer.param_groups for p in group["params"]]
        optimizer_state = shard_optimizer_state(optimizer_state, held)
    run.optimizer.load_state_dict(optimizer_state)
    run.scheduler.load_state_dict(state.scheduler)
    rng = state.rng
    per_rank = rng.get("ranks") or []
    if run.ranks is not None and len(per_rank) == run.ranks.world:
        rng = per_rank[run.ranks.rank]  # each rank's own streams (its dropout masks)
    torch.set_rng_state(rng["torch"])
    if run.device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    run.choice = Choice(tuple(state.selection), 0, state.selection_details)
    run.trained = set(state.trained)
    run.reports = [EpochReport(**r) for r in state.reports]
    run.start_epoch = state.epoch + 1


# -- one epoch -----------------------------------------------------------------------------------------------


@dataclass
class _EpochSteps:
    steps: int  # optimizer steps taken
    tokens: int  # real tokens in the epoch's batches
    mean_loss: float | None  # None when nothing trained
    measured_flops: int  # FlopCounterMode's count of the loop's first step


def _train_epoch(run: _Run, epoch: int, hooks: _Hooks) -> EpochReport | None:
    """Choose the epoch's tensors, train them on the epoch's batches, validate; None when asked to stop."""
    hp = run.hp
    started = time.perf_counter()
    run.meter.start()
    # The last epoch's wrapper goes first: its hooks would all-reduce the importance passes' gradients.
    run.ddp = None
    plan = plan_epoch(run.train_data, hp, run.spec.seed, epoch)
    importance_batches = [run.batch(idx) for idx in plan.importance_rows]
    # The importance passes run on the same micro-batches as a training step, each weighted by its share of
    # its batch's loss and the batches averaged: their first gradients are a training step's.
    # Sharded, every rank measures its rows of them (weighted by their share: the ranks' gradients add up).
    split = (lambda b: _rank_parts(run, b)) if run.sharded is not None else run.micro_batches
    parts = [(m, w / len(importance_batches)) for b in importance_batches for m, w in split(b)]
    full_flops = run.profiles.full(plan.shapes)
    profile = run.profiles.steps(plan.shapes)
    ctx = EpochContext(
        epoch=epoch,
        model=run.model,
        profile=profile,
        full_flops=full_flops,
        first_step_reusable=plan.first_step_from_importance,
        loop_profile=lambda after_first: run.profiles.steps(plan.shapes[1:]) if after_first else profile,
        later=lambda: _later_epochs(run, epoch),
        importance_batches=[m for m, _ in parts],
        importance_weights=[w for _, w in parts],
        autocast=run.autocast,
        held_in_float32=run.held.widened,
        importance_profile=run.importance_profiles.steps(plan.importance_shapes),
        # The tentative step of the importance pass is the training optimizer's next step (a copy of it: its
        # moments and the scheduled learning rate), as in the paper's code.
        optimizer_factory=tentative_optimizer_factory(run.optimizer),
        sum_over_ranks=run.ranks.sum if run.sharded is not None else None,
        previous=run.choice.names if run.choice is not None else (),
        run_epochs=lambda: _planned_epochs(run),
    )
    if run.ranks is None:
        new_choice = run.method.choose(ctx)
    elif run.sharded is not None:  # every rank measures its shards; the summed scores choose alike
        run.sharded.set_trained(None)  # the importance passes' candidates may reach any layer
        new_choice = _same_choice(run.ranks, run.method.choose(ctx))
    else:  # rank 0 measures and chooses; every rank takes its choice
        new_choice = _shared_choice(run, run.method.choose(ctx) if run.ranks.leader else None)
    run.choice = new_choice or run.choice
    assert run.choice is not None, "every method chooses in the first epoch"
    names = run.choice.names
    run.held.widen(names)  # trained tensors are float32 from now on (precision bf16)
    for name, param in run.model.named_parameters():
        param.requires_grad_(name in names)
    run.trained |= set(names)
    if run.sharded is not None:  # backward gathers the layers it enters, no deeper
        run.sharded.set_trained(names)
    if run.ranks is not None and run.sharded is None and names:
        # DDP registers the tensors that train when it is built: a new wrapper for the epoch's choice.
        run.ddp = wrap(run.model, run.ranks)

    # The one place that knows the importance pass may have computed the epoch's first step: the loop then
    # starts at the second batch, and the FLOPs below are the loop's steps plus the importance passes.
    first = new_choice.first_step if new_choice is not None else None
    skip = 0 if first is None else 1
    steps = _run_steps(run, plan, epoch, hooks, first, importance_batches[0] if first else None)
    if steps is None:
        return None

    # An epoch that trains nothing runs no step, not even a forward: it costs only its selection.
    looped = run.profiles.steps(plan.shapes[1:]) if skip else profile  # the steps the loop ran
    train_flops = looped.step_flops(names) if names else StepFlops(0, 0, 0)
    selection_flops = new_choice.selection_flops if new_choice is not None else 0
    total = train_flops.total + selection_flops
    valid_started = time.perf_counter()
    communicated = run.ranks.take_bytes() if run.ranks is not None else 0
    valid_loss, valid_acc = evaluate(
        run.model, run.valid_data, run.tokenizer.pad_token_id, hp, run.device, run.autocast, run.ranks
    )
    # Sharded, validation gathers the layers too; full fine-tuning's validation would gather the same.
    validation_bytes = run.ranks.take_bytes() if run.ranks is not None else 0
    wall_s = time.perf_counter() - started
    energy = _energy(run, total)
    return EpochReport(
        epoch=epoch,
        selected_tensors=list(names),
        flops={
            "fwd": train_flops.fwd,
            "bwd_act": train_flops.bwd_act,
            "bwd_weight": train_flops.bwd_weight,
            "selection": selection_flops,
            "total": total,
            "full": full_flops,
            "predicted_step": run.profiles.steps([plan.shapes[skip]]).step_flops(names).total if names else 0,
            "measured_step": steps.measured_flops,
        },
        rho_achieved=total / full_flops,
        tokens=steps.tokens,
        wall_s=wall_s,
        valid_wall_s=time.perf_counter() - valid_started,
        train_loss=steps.mean_loss,
        valid_loss=valid_loss,
        valid_accuracy=valid_acc if run.task == "classification" else None,
        valid_token_accuracy=valid_acc if run.task != "classification" else None,
        energy_j=energy.energy_j,
        energy_method=energy.method,
        gco2e=grams_co2e(energy.energy_j, run.spec.energy),
        steps=steps.steps,
        truncated_examples=run.train_data.truncated,
        energy_inputs=energy.inputs,
        selection={**_plain(run.choice.details), "reselected": new_choice is not None},
        dropped_examples=run.train_data.dropped,
        learning_rate=hp.learning_rate,
        device_name=run.spec.energy.device_name,
        world_size=run.ranks.world if run.ranks is not None else 1,
        communication_bytes=communicated + validation_bytes,
        communication_bytes_full=_full_communication(run, plan, steps.steps) + validation_bytes,
    )


def _full_communication(run: _Run, plan: EpochPlan, steps: int) -> int:
    """What full fine-tuning would exchange over the epoch's ``steps`` on these ranks (0 on one rank): with
    DDP, a float32 gradient of every parameter of the base per step all-reduced; sharded, every step's
    all-gathers and reduce-scatters (``Sharded.full_step_bytes``) for the micro-batches each rank runs."""
    if run.ranks is None or not steps:
        return 0
    if run.sharded is not None:
        return sum(run.sharded.full_step_bytes(_rank_passes(run, shape[0])) for shape in plan.shapes)
    with run.method.full_baseline(run.model) or contextlib.nullcontext():
        n = sum(p.numel() for p in run.model.parameters())
    return 4 * n * steps


def _energy(run: _Run, flops: int) -> Any:
    """The epoch's energy reading, summed over ranks: a counter of one GPU (NVML) on every rank, a counter of
    the machine (RAPL) on the first rank of each machine, an estimate from the epoch's FLOPs (all ranks')
    on rank 0 only."""
    reading = run.meter.stop(flops)
    ranks = run.ranks
    if ranks is None:
        return reading
    counts = {
        "nvml": True,
        "rapl": ranks.local_rank == 0,
    }.get(reading.method, ranks.leader)
    total = ranks.sum([reading.energy_j if counts else 0.0])[0]
    return replace(reading, energy_j=total)


def _same_choice(ranks: Ranks, choice: Choice | None) -> Choice | None:
    """``choice``, made on every rank from the same summed scores, checked to be rank 0's (every rank raises
    together if it is not); rank 0's details are recorded."""
    mine = (tuple(choice.names), choice.selection_flops) if choice is not None else None
    head = ranks.broadcast_object((mine, choice.details if choice is not None else None))
    if ranks.any(head[0] != mine):
        raise RuntimeError("the ranks chose different tensors from the same importance scores")
    return replace(choice, details=head[1]) if choice is not None else None


def _shared_choice(run: _Run, choice: Choice | None) -> Choice | None:
    """Rank 0's ``choice`` on every rank, with the first step's gradients broadcast (their bytes counted)."""
    ranks = run.ranks
    assert ranks is not None
    first = choice.first_step if choice is not None else None
    head = None
    if choice is not None:
        grads = [(n, tuple(g.shape), str(g.dtype)) for n, g in first.gradients.items()] if first else None
        loss = first.loss if first else None
        head = (tuple(choice.names), choice.selection_flops, choice.details, grads, loss)
    head = ranks.broadcast_object(head)
    if head is None:
        return None
    names, flops, details, grads, loss = head
    if grads is None:
        return Choice(names, flops, details)
    tensors = [
        first.gradients[n].to(run.device)
        if first is not None
        else torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=run.device)
        for n, shape, dtype in grads
    ]
    ranks.broadcast_tensors(tensors)
    gradients = dict(zip((n for n, *_ in grads), tensors, strict=True))
    return Choice(names, flops, details, FirstStep(gradients, loss))


def _planned_epochs(run: _Run) -> list[EpochCosts]:
    """Every epoch of the run as planned: the estimate's plan (``plan_costing``) on the run's profiles."""
    costing, _ = plan_costing(
        run.model, run.train_data, run.hp, run.spec.seed, run.profiles, run.importance_profiles
    )
    return run_epochs(costing)


def _later_epochs(run: _Run, epoch: int) -> list[tuple[Any, int]]:
    """(combined profile, full FLOPs) of the epochs after ``epoch`` that its selection covers."""
    last = min(epoch + (run.hp.reselect_every or 1), run.hp.n_epochs + 1)
    plans = [plan_epoch(run.train_data, run.hp, run.spec.seed, e) for e in range(epoch + 1, last)]
    return [(run.profiles.steps(p.shapes), run.profiles.full(p.shapes)) for p in plans]


def _run_steps(
    run: _Run, plan: EpochPlan, epoch: int, hooks: _Hooks, first: FirstStep | None, first_batch: Batch | None
) -> _EpochSteps | None:
    """The epoch's optimizer steps over ``plan``'s batches; the first the loop runs is measured under
    FlopCounterMode. ``first``: the first batch's step, computed by the importance pass: applied here, and the
    loop starts at the second batch. None when ``should_stop`` said so before the epoch ended."""
    model, n = run.model, len(plan.batches)
    trains = bool(run.choice and run.choice.names)  # else nothing fits the budget: the epoch trains nothing
    model.train()
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    tokens = measured = 0
    if first is not None and first_batch is not None:
        named = dict(model.named_parameters())
        for name, grad in first.gradients.items():
            named[name].grad = grad.to(named[name].device)  # in host memory when importance offloaded it
        _optimizer_step(run)
        loss_sum += first.loss
        tokens += _tokens(first_batch, run.task)
        if hooks.on_step is not None:
            hooks.on_step(epoch, 1, n)
    start = 2 if first is not None else 1
    for step, idx in enumerate(plan.batches[start - 1 :], start=start):
        if hooks.stop(run.ranks):
            return None
        batch = run.batch(idx)
        tokens += _tokens(batch, run.task)
        if trains:
            # forward and backward (the loop's first step under FlopCounterMode), then clip, step, schedule
            counter = FlopCounterMode(display=False) if step == start else contextlib.nullcontext()
            with counter:
                loss = _forward_backward(run, batch)
            if step == start:
                measured = int(counter.get_total_flops())
            _optimizer_step(run)
            loss_sum += loss
            if step % LOSS_CHECK_EVERY == 0 or step == n:  # a read syncs a GPU: not every step
                # Every rank checks the sum over ranks, so all stop together.
                _check_finite(run.ranks.sum_tensor(loss_sum) if run.ranks else loss_sum, epoch, step)
        if hooks.on_step is not None:
            hooks.on_step(epoch, step, n)
    if run.ranks is not None:  # each rank ran and measured its rows: the steps' sums over ranks
        if first is not None:
            loss_sum -= first.loss * (run.ranks.world - 1) / run.ranks.world  # every rank added it whole
        measured = int(run.ranks.sum([measured])[0]) if trains else 0
        loss_sum = run.ranks.sum_tensor(loss_sum)
    mean = loss_sum.item() / n if trains else None
    return _EpochSteps(n if trains else 0, tokens, mean, measured)


def _forward_backward(run: _Run, batch: Batch) -> torch.Tensor:
    """Gradients of ``batch``'s loss into ``.grad``, micro-batch by micro-batch (on several ranks: this rank's
    rows of it, through DDP, which averages the ranks' gradients after the last micro-batch); returns this
    process's part of the loss (detached, float32: the parts of all ranks add up to the batch's loss)."""
    if run.ranks is None:
        parts, model, scale = run.micro_batches(batch), run.model, 1
    elif run.sharded is not None:  # FSDP2 here sums the ranks' gradients (greencore.sharded)
        parts, model, scale = _rank_parts(run, batch), run.model, 1
    else:  # DDP divides the sum of the ranks' gradients by their number
        parts, model, scale = _rank_parts(run, batch), run.ddp or run.model, run.ranks.world
    total = torch.zeros((), device=run.device)
    for i, (part, weight) in enumerate(parts):
        last = i == len(parts) - 1
        sync = run.ddp.no_sync() if run.ddp is not None and not last else contextlib.nullcontext()
        if run.sharded is not None:  # the gradients are reduce-scattered after the last micro-batch
            run.sharded.set_gradient_sync(last)
        with sync:
            with run.autocast:
                loss = model(**part).loss
            factor = weight * scale
            (loss if factor == 1.0 else loss * factor).backward()
        total += loss.detach().float() if weight == 1.0 else loss.detach().float() * weight
    return total


def _rank_parts(run: _Run, batch: Batch) -> list[tuple[Batch, float]]:
    """This rank's rows of ``batch`` as micro-batches, each weighted by its share of the whole batch's loss
    terms. A rank left without a row (a batch smaller than the world) runs the batch's first row with weight
    0: DDP needs every rank's backward, and its FLOPs are counted in the step it measures. Sharded, every
    rank runs as many micro-batches as the rank with the most rows (each forward gathers the layers, a
    collective), the missing ones as that first row with weight 0."""
    assert run.ranks is not None
    n = batch["input_ids"].shape[0]
    rows = run.ranks.rows(n)
    dummy = ({k: v[:1] for k, v in batch.items()}, 0.0)
    if not rows:
        parts = [dummy]
    else:
        shard = run.ranks.shard(batch)
        share = _loss_terms(shard, run.task) / _loss_terms(batch, run.task)
        parts = [(part, weight * share) for part, weight in run.micro_batches(shard)]
    if run.sharded is not None:
        parts += [dummy] * (_rank_passes(run, n) - len(parts))
    return parts


def _rank_passes(run: _Run, rows: int) -> int:
    """The micro-batches the rank with the most of ``rows`` runs (the first rank's slice is the largest)."""
    assert run.ranks is not None
    most = math.ceil(rows / run.ranks.world)
    size = run.hp.micro_batch_size
    return 1 if size is None or most == 0 else math.ceil(most / size)


def micro_batches(batch: Batch, task: str, size: int | None) -> list[tuple[Batch, float]]:
    """``batch`` cut into consecutive micro-batches of ``size`` rows (None: one), each with its weight: its
    share of the loss terms the batch's mean loss averages (target tokens; rows for classification), so that
    the weighted sum of their mean losses is the batch's. Every micro-batch keeps the batch's padded length,
    so their FLOPs add up to the batch's."""
    rows = batch["input_ids"].shape[0]
    if size is None or size >= rows:
        return [(batch, 1.0)]
    parts = [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, rows, size)]
    counts = [_loss_terms(part, task) for part in parts]
    total = sum(counts)
    return [(part, count / total) for part, count in zip(parts, counts, strict=True)]


def _loss_terms(batch: Batch, task: str) -> int:
    """The terms a model's mean loss over ``batch`` averages: rows (classification), target tokens (seq2seq),
    or target tokens after the shift by one (causal LM)."""
    labels = batch["labels"]
    if task == "classification":
        return int(labels.shape[0])
    if task == "causal_lm":
        labels = labels[:, 1:]
    return int((labels != IGNORE).sum())


def _optimizer_step(run: _Run) -> None:
    """One training step from the gradients in ``.grad``: clip, step, schedule, clear."""
    if run.hp.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in run.params if p.grad is not None], run.hp.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not bool(torch.isfinite(loss_sum)):
        raise LossNotFinite(
            f"the training loss became {loss_sum.item()} in epoch {epoch} (by step {step}): "
            "training diverged; "
            "lower learning_rate (or use bf16/fp32 weights); the checkpoints of earlier epochs are kept"
        )


# -- checkpoint ----------------------------------------------------------------------------------------------


def _save(run: _Run, report: EpochReport) -> None:
    """Write the epoch's checkpoint (the model as its method exports it, and the state to resume from)."""
    assert run.choice is not None
    run.last_dir = checkpoint.epoch_dir(run.spec.output_dir, report.epoch)
    report.checkpoint_dir = str(run.last_dir)
    run.reports.append(report)
    device = run.device
    rng = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    model, optimizer_state = run.model, None
    if run.sharded is not None:  # every rank gathers its shards; rank 0 holds the whole model in host memory
        from greencore.sharded import gather_optimizer_state, gather_state, host_model

        assert run.ranks is not None and run.twin is not None
        tensors = gather_state(run.model, run.ranks.leader)
        optimizer_state = gather_optimizer_state(run.optimizer, run.ranks.leader)
        model = host_model(run.twin, tensors) if run.ranks.leader else model
    if run.ranks is not None:  # every rank's streams, for each rank to resume its own
        every = run.ranks.gather_objects(rng)
        if not run.ranks.leader:  # rank 0 writes; the others wait for the checkpoint to be whole
            run.ranks.barrier()
            return
        rng = {**rng, "ranks": every}
    state = TrainingState(
        fingerprint=run.fingerprint,
        epoch=report.epoch,
        global_step=report.epoch * math.ceil(len(run.train_data) / run.hp.batch_size),
        optimizer=optimizer_state or run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        rng=rng,
        selection=list(run.choice.names),
        selection_details=_plain(run.choice.details),
        trained=sorted(run.trained),
        reports=[_plain(asdict(r)) for r in run.reports],
    )
    export = run.method.export(model)
    # Tensors that never trained, as the base holds them (precision bf16 keeps the originals bf16 cannot
    # hold).
    export = replace(export, tensors=run.held.originals(export.tensors))
    # Trained tensors saved in a dtype narrower than float32 keep their float32 values beside, for an exact
    # resume (a method's own tensors, such as LoRA's adapters, are not among the exported ones).
    narrow = [
        n
        for n in sorted(run.trained)
        if n in export.tensors and run.dtypes.get(n, run.default_dtype) != torch.float32
    ]
    checkpoint.save_checkpoint(
        run.last_dir,
        export,
        run.tokenizer,
        run.dtypes,
        run.default_dtype,
        state.to_dict(),
        master_names=narrow,
    )
    if run.ranks is not None:
        run.ranks.barrier()


# -- loading -------------------------------------------------------------------------------------------------


def _load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out and carry no loss, so any token will do; the end-of-sequence one
        # is the usual choice.
        if tokenizer.eos_token is None:
            raise ModelFolderError(f"the tokenizer in {model_dir} has neither a padding nor an end token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(
    source: str, task: str, labels: list[str] | None, tokenizer: Any, attention: str
) -> tuple[nn.Module, list[str]]:
    """The model in ``source`` (a base folder or a checkpoint), in float32, with ``attention`` (an
    :class:`Attention`), and the modules the folder did not have (a fresh classification head). Raises
    SpecError when the architecture has no such attention implementation."""
    kwargs: dict[str, Any] = {"dtype": torch.float32, "local_files_only": True}
    if task == "classification":
        assert labels is not None
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
            ignore_mismatched_sizes=True,
        )
    try:
        model, info = auto_class(task).from_pretrained(source, output_loading_info=True, **kwargs)
    except (
        OSError,
        ValueError,
        KeyError,
        SafetensorError,
    ) as exc:  # SafetensorError: a weights file cut short
        raise ModelFolderError(f"cannot load {source} as a {task} model: {exc}") from exc
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # classifiers find the last real token by it
    if attention != Attention.AUTO:
        # Switched after loading (the weights do not depend on it), so that an architecture without it is
        # refused as a setting, not as a broken model folder.
        try:
            model.set_attn_implementation(str(attention))
        except ValueError as exc:
            raise SpecError("attention", str(exc)) from exc
        if model.config._attn_implementation != attention:  # a model that cannot switch only warns
            raise SpecError("attention", f"{type(model).__name__} cannot run attention={attention}")
    fresh = list(info.get("missing_keys", [])) + [k for k, *_ in info.get("mismatched_keys", [])]
    new_modules = sorted({key.rsplit(".", 1)[0] for key in fresh if "." in key})
    return model, new_modules


# -- shared pieces -------------------------------------------------------------------------------------------


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup over ``warmup_steps``, then linear decay to 0 at
    ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _tokens(batch: Batch, task: str) -> int:
    """Real (unpadded) tokens of a batch: inputs, plus targets for seq2seq."""
    n = int(batch["attention_mask"].sum())
    if task == "seq2seq":
        n += int((batch["labels"] != IGNORE).sum())
    return n


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Encoded | None,
    pad_id: int,
    hp: Hyperparameters,
    device: torch.device,
    autocast: AbstractContextManager[Any],
    ranks: Ranks | None = None,
) -> tuple[float | None, float | None]:
    """Validation loss (mean per example for classification, per target token otherwise) and accuracy
    (share of examples, or of target tokens predicted right). (None, None) without validation data. On
    several ranks each evaluates its rows of every batch (collated whole, as one process does) and the sums
    are added over ranks."""
    if data is None or not len(data):
        return None, None
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    right = count = 0
    for start in range(0, len(data), hp.batch_size):
        idx = list(range(start, min(start + hp.batch_size, len(data))))
        batch = _to(collate(data, idx, pad_id, hp.max_seq_len), device)
        if ranks is not None:
            rows = ranks.rows(len(idx))
            if not rows:
                if ranks.sharded:  # a forward gathers the layers, a collective: join it with one row
                    with autocast:
                        model(**{k: v[:1] for k, v in batch.items()})
                continue
            batch = ranks.shard(batch)
            idx = idx[rows.start : rows.stop]
        labels = batch.pop("labels")
        if data.task == "seq2seq":
            batch["labels"] = labels  # the decoder's inputs are the targets shifted right
        with autocast:
            logits = model(**batch).logits.float()
        if data.task == "classification":
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            right += int((logits.argmax(-1) == labels).sum())
            count += len(idx)
            continue
        if data.task == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        keep = labels != IGNORE
        loss_sum += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        right += int((logits.argmax(-1)[keep] == labels[keep]).sum())
        count += int(keep.sum())
    model.train(was_training)
    if ranks is not None:
        loss_sum, right, count = ranks.sum([loss_sum, right, count])
    return loss_sum / max(count, 1), right / max(count, 1)


def _plain(value: Any) -> Any:
    """Only plain JSON-able values (so training_state.pt loads with weights_only=True)."""
    return json.loads(json.dumps(value, default=str))


def _digest(path: str | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(spec: TrainSpec, hp: Hyperparameters) -> str:
    """What a checkpoint must have been trained with to be resumed by ``spec`` (``hp``: its hyperparameters
    with the budget resolved to a rho)."""
    # The engine is not: a checkpoint holds full tensors, whatever split the ranks that wrote it.
    skip = ("max_flops", "max_energy_kwh", "distributed")
    settings = {k: v for k, v in hp.as_dict().items() if k not in skip}
    if settings["importance_rows"] is None:  # added later: at its default, earlier checkpoints still resume
        del settings["importance_rows"]
    what = {
        "model": str(Path(spec.model_dir).resolve()),
        "train": _digest(spec.train_file),
        "valid": _digest(spec.valid_file),
        "method": spec.method,
        "hyperparameters": settings,
        "seed": spec.seed,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
