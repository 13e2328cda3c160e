"""What a run costs before it runs, and the budget its hyperparameters put in force.

``run_costs`` plans the run's epochs with the training run's own planner (``greencore.plan``), profiles each
row shape once on the base model built on the meta device, and asks the method what it spends
(``Method.cost``). ``RunCosts.estimate`` then resolves the budget (``rho``, ``max_flops`` or
``max_energy_kwh``) and prices the FLOPs on a device profile: ``time_s = flops / (peak * utilization)``,
``energy_j = time_s * watts``, ``gco2e = kWh * intensity * PUE``. The split lets a caller cache the costs
(planning and profiling) and price many budgets against them.

The estimate also gives the run's peak memory, and full fine-tuning's on the same batches: one training step
and one importance evaluation replayed on fake tensors at the run's largest batch shapes
(``greencore.memory``), for what the method trains at the budget in force (``Method.memory_plan``). It is
computed when first asked for a trained set and kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from greencore.data import Encoded
from greencore.energy import J_PER_KWH, grams_co2e
from greencore.lr import AutoLearningRate, LearningRateBasis, auto_learning_rate, non_embedding_params
from greencore.memory import MemoryPlan, PeakMemory, RunShapes
from greencore.methods import RunCosting, make_method
from greencore.models import TRACE_LOCK, load_config, meta_model
from greencore.plan import ShapeProfiles, plan_epoch
from greencore.select import BudgetTooSmall
from greencore.spec import AUTO, EnergySettings, Hyperparameters
from greencore.throughput import Calibration, CalibrationBasis, declared


@dataclass(frozen=True)
class FullAndMethod:
    full: float  # full fine-tuning
    method: float  # the method at the budget in force


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of the run and of full fine-tuning on the same batches, bytes."""

    full: PeakMemory
    method: PeakMemory
    basis: str  # "exact": the method's own tensors; "bound": every tensor its selection could reach
    device: str  # the device type replayed: "cpu" or "cuda"
    world_size: int = 1  # the peaks are one rank's (rank 0's, the largest) of a run on this many ranks


class RunMemory:
    """The peak memory of a planned run at a budget (computed on fake tensors when first asked, then kept)."""

    def __init__(
        self, method: str, costing: RunCosting, shapes: RunShapes, device: str, world_size: int = 1
    ) -> None:
        self.method = method
        self.costing = costing
        self.shapes = shapes
        self.device = device
        self.world_size = world_size

    def at(self, hp: Hyperparameters, rho: float | None) -> MemoryEstimate:
        """The peaks of the run with ``hp`` at the budget ``rho`` in force, and of full fine-tuning."""
        model = self.costing.model
        with TRACE_LOCK:
            plan = make_method(self.method, hp).memory_plan(self.costing, rho)
            full = MemoryPlan(model, tuple(n for n, _ in model.named_parameters()))
            return MemoryEstimate(
                full=self.shapes.peak(full, hp, self.device, self.world_size),
                method=self.shapes.peak(plan, hp, self.device, self.world_size),
                basis=plan.basis,
                device=self.device,
                world_size=self.world_size,
            )


@dataclass(frozen=True)
class RunEstimate:
    """A run's cost before it runs, on the device profile of ``energy`` (calibrated where ``time_basis`` /
    ``energy_basis`` say "measured")."""

    method: str
    task: str
    n_epochs: int
    examples: int  # trained per epoch
    tokens: int  # per epoch, after cutting at max_seq_len
    truncated_examples: int
    steps_per_epoch: int
    rho: float | None  # the budget in force; None for a fixed tensor set
    rho_min: float
    flops_full: int  # the whole run
    flops_method: int
    basis: str  # "budget", "profile" or "approximate" (Method.cost)
    time_s: FullAndMethod  # training seconds: steps and importance passes, not validation
    energy_j: FullAndMethod
    gco2e: FullAndMethod
    min_max_flops: float  # the smallest whole-run FLOPs budget that trains anything
    min_max_energy_kwh: float  # the same as energy on the device profile
    time_basis: CalibrationBasis  # measured epochs or the declared profile
    energy_basis: CalibrationBasis
    learning_rate: AutoLearningRate  # the automatic learning rate at this budget
    memory: MemoryEstimate | None = None  # None where the costs were made without a memory model
    settings: dict[str, int] = field(
        default_factory=dict
    )  # what the method chose for the run (reselect_every)

    @property
    def flops_saved(self) -> float:
        return 1 - self.flops_method / self.flops_full if self.flops_full else 0.0


@dataclass(frozen=True)
class RunCosts:
    """The FLOPs of a run planned on a dataset, full fine-tuning's and the method's (no budget applied)."""

    method: str
    task: str
    n_epochs: int
    examples: int
    tokens: int
    truncated_examples: int
    steps_per_epoch: int
    full: int  # FLOPs of full fine-tuning over the whole run
    flops: int | None  # the method's; None: what its budget allows (rho x full)
    rho_min: float
    basis: str
    lr_basis: LearningRateBasis  # what the automatic learning rate is computed from
    costing: RunCosting | None = field(default=None, compare=False, repr=False)
    memory: RunMemory | None = field(default=None, compare=False, repr=False)

    def auto_learning_rate(self, hp: Hyperparameters, rho: float | None) -> AutoLearningRate:
        """The automatic learning rate (``greencore.lr``) of the run with ``hp`` at the budget ``rho`` in
        force (None: a method's fixed tensor set)."""
        if self.costing is None:
            raise ValueError(
                "the automatic learning rate needs the run's costing (greencore.estimate.run_costs)"
            )
        scale = make_method(self.method, hp).learning_rate_scale(
            self.costing, rho, self.lr_basis.forward_share
        )
        return auto_learning_rate(self.lr_basis, scale)

    def resolve_rho(self, hp: Hyperparameters, energy: EnergySettings) -> float | None:
        """The rho ``hp`` puts in force (see :func:`resolve_rho`); a refusal names what would make the run fit
        (``Method.advice``)."""
        try:
            return resolve_rho(self.method, hp, self.full, self.rho_min, energy)
        except BudgetTooSmall as exc:
            if self.costing is None:
                raise
            with TRACE_LOCK:
                advice = make_method(self.method, hp).advice(self.costing, min(exc.rho, 1.0))
            if not advice:
                raise
            raise BudgetTooSmall(exc.rho, exc.rho_min, exc.detail, str(exc), advice) from exc

    def settings(self, hp: Hyperparameters, rho: float | None) -> dict[str, Any]:
        """What the method chooses for the run at the budget ``rho`` in force, of what ``hp`` left to it
        (``Method.settle``: green's automatic ``reselect_every``)."""
        if self.costing is None:
            return {}
        with TRACE_LOCK:
            return make_method(self.method, hp).settle(self.costing, rho)

    def settled(self, hp: Hyperparameters, rho: float | None) -> Hyperparameters:
        """``hp`` with what the method chose for the run at ``rho`` in place of what was left to it."""
        return replace(hp, **self.settings(hp, rho))

    def estimate(
        self, hp: Hyperparameters, energy: EnergySettings, calibration: Calibration | None = None
    ) -> RunEstimate:
        """The run's cost at the budget of ``hp``, timed and priced by ``calibration`` (default: the declared
        profile ``energy``); BudgetTooSmall or SpecError when that budget is refused."""
        rho = self.resolve_rho(hp, energy)
        auto = self.auto_learning_rate(hp, rho)
        if hp.learning_rate == AUTO:  # the memory replay's optimizer takes a number (its value costs nothing)
            hp = replace(hp, learning_rate=auto.learning_rate)
        method_flops = self.flops if self.flops is not None else int((rho or 1.0) * self.full)
        calibration = calibration or declared(energy)
        steps = self.steps_per_epoch * self.n_epochs
        seconds = FullAndMethod(calibration.time_s(self.full, steps), calibration.time_s(method_flops, steps))
        joules = FullAndMethod(
            calibration.energy_j(self.full, steps), calibration.energy_j(method_flops, steps)
        )
        min_flops = self.rho_min * self.full
        settings = self.settings(hp, rho)  # green's automatic reselect_every: a few rho_min plans, once
        return RunEstimate(
            method=self.method,
            task=self.task,
            n_epochs=self.n_epochs,
            examples=self.examples,
            tokens=self.tokens,
            truncated_examples=self.truncated_examples,
            steps_per_epoch=self.steps_per_epoch,
            rho=rho,
            rho_min=self.rho_min,
            flops_full=self.full,
            flops_method=method_flops,
            basis=self.basis,
            time_s=seconds,
            energy_j=joules,
            gco2e=FullAndMethod(grams_co2e(joules.full, energy), grams_co2e(joules.method, energy)),
            min_max_flops=min_flops,
            min_max_energy_kwh=min_flops / flops_per_kwh(energy),
            time_basis=calibration.basis_for(method_flops, steps),
            energy_basis=calibration.energy_basis,
            learning_rate=auto,
            memory=self.memory.at(replace(hp, **settings), rho) if self.memory is not None else None,
            settings=settings,
        )


def run_costs(
    model_dir: str | Path,
    data: Encoded,
    method: str,
    hp: Hyperparameters,
    seed: int,
    num_labels: int | None = None,
    device: str | None = None,
    world_size: int = 1,
) -> RunCosts:
    """The FLOPs of training ``data`` (encoded for ``model_dir``'s tokenizer) with ``method`` and ``hp``:
    the run's own batches (seeded), each row shape profiled once (cached by model structure). ``num_labels``:
    the classifier's classes (classification data). The budget fields of ``hp`` do not enter. ``device``:
    the device type the run's memory is replayed for ("cpu" or "cuda"; default CUDA when present);
    ``world_size``: the ranks the run will train on (the memory is then one rank's, under ``hp.distributed``;
    the FLOPs are the run's, summed over ranks)."""
    costed = make_method(method, hp)
    model = _meta_model(str(model_dir), _mtime(model_dir), data.task, num_labels)
    attention = None if hp.attention == "auto" else hp.attention
    profiles = ShapeProfiles(model, attention=attention, checkpointing=hp.gradient_checkpointing)
    # The importance passes run in eval mode, where no layer is checkpointed.
    importance_profiles = ShapeProfiles(model, attention=attention, checkpointing=False)
    costing, shapes = plan_costing(model, data, hp, seed, profiles, importance_profiles)
    with TRACE_LOCK:
        cost = costed.cost(costing)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    return RunCosts(
        method=method,
        task=data.task,
        n_epochs=hp.n_epochs,
        examples=len(data),
        tokens=sum(len(ids) for ids in data.input_ids),
        truncated_examples=data.truncated,
        steps_per_epoch=-(-len(data) // hp.batch_size),
        full=sum(p.full.total for p in costing.epochs),
        flops=cost.flops,
        rho_min=cost.rho_min,
        basis=cost.basis,
        lr_basis=LearningRateBasis(
            non_embedding_params=non_embedding_params(model),
            batch_size=hp.batch_size,
            forward_share=sum(p.full.fwd for p in costing.epochs) / sum(p.full.total for p in costing.epochs),
        ),
        costing=costing,
        memory=RunMemory(method, costing, shapes, device, world_size),
    )


REPLAN_EXAMPLES = 4096  # datasets up to this size keep a way to replan their run, for a refusal's advice


def plan_costing(
    model: nn.Module,
    data: Encoded,
    hp: Hyperparameters,
    seed: int,
    profiles: ShapeProfiles,
    importance_profiles: ShapeProfiles,
    repeat: int = 1,
) -> tuple[RunCosting, RunShapes]:
    """The run's epochs planned and profiled (``data`` repeated ``repeat`` times), and its batch shapes."""
    planned = data if repeat == 1 else repeated(data, repeat)
    epochs, importance, after_first = [], [], []
    shapes = RunShapes(data.task, [], [])
    with TRACE_LOCK:
        for epoch in range(1, hp.n_epochs + 1):
            plan = plan_epoch(planned, hp, seed, epoch)
            epochs.append(profiles.steps(plan.shapes))
            importance.append(importance_profiles.steps(plan.importance_shapes))
            after_first.append(profiles.steps(plan.shapes[1:]) if plan.first_step_from_importance else None)
            shapes.steps.extend(plan.shapes)
            shapes.importance.extend(plan.importance_shapes)

    def replan(other: Hyperparameters, times: int) -> RunCosting:
        return plan_costing(model, data, other, seed, profiles, importance_profiles, times)[0]

    small = len(data) <= REPLAN_EXAMPLES  # a larger one is not held beyond the estimate's own caches
    costing = RunCosting(
        model, epochs, importance, hp, after_first, replan if small else None, examples=len(planned)
    )
    return costing, shapes


def repeated(data: Encoded, times: int) -> Encoded:
    """``data`` with every example ``times`` times: a dataset like it, that much larger."""
    return replace(
        data,
        input_ids=data.input_ids * times,
        labels=data.labels * times,  # type: ignore[operator]
        truncated=data.truncated * times,
        dropped=data.dropped * times,
        dropped_lines=[],
    )


def flops_per_kwh(energy: EnergySettings) -> float:
    """FLOPs the device profile does per kWh."""
    return energy.peak_flops * energy.utilization * J_PER_KWH / energy.watts


def resolve_rho(
    method: str, hp: Hyperparameters, full_run_flops: int, rho_min: float, energy: EnergySettings
) -> float | None:
    """The rho a run's hyperparameters put in force, or BudgetTooSmall naming the smallest budget.

    ``rho`` as given; ``max_flops`` / ``max_energy_kwh`` (whole run) converted to the share of full
    fine-tuning they allow (1 at most); none: the method's default (None for a method that trains a fixed set
    of tensors, which refuses a budget: SpecError).
    """
    costed = make_method(method, hp)
    costed.check()
    if costed.default_rho is None:
        return None
    min_flops = rho_min * full_run_flops
    min_kwh = min_flops / flops_per_kwh(energy)
    smallest = (
        f"the smallest budget that trains anything is rho_min={rho_min:.4f} of full fine-tuning, "
        f"max_flops={min_flops:.4g} or max_energy_kwh={min_kwh:.4g}"
    )
    if hp.rho is not None:
        rho, asked = hp.rho, f"rho={hp.rho:g}"
    elif hp.max_flops is not None:
        implied = hp.max_flops / full_run_flops
        rho, asked = min(1.0, implied), f"max_flops={hp.max_flops:.4g} (rho {implied:.4f})"
    elif hp.max_energy_kwh is not None:
        allowed = hp.max_energy_kwh * flops_per_kwh(energy)
        implied = allowed / full_run_flops
        rho = min(1.0, implied)
        asked = (
            f"max_energy_kwh={hp.max_energy_kwh:.4g} ({allowed:.4g} FLOPs on {energy.device_name}, "
            f"rho {implied:.4f})"
        )
    else:
        rho, asked = costed.default_rho, f"the default rho={costed.default_rho}"
    if rho_min > 1:
        raise BudgetTooSmall(
            rho,
            rho_min,
            message=f"{method} cannot train on this dataset within any budget: choosing the tensors "
            f"(importance passes) and training one tensor cost {rho_min:.4f} of full fine-tuning "
            "(rho_min > 1); "
            "give more steps per epoch (more examples or a smaller batch_size), fewer importance_batches or "
            "importance_rows, or a larger reselect_every",
        )
    if rho < rho_min:
        raise BudgetTooSmall(rho, rho_min, message=f"{asked} is below rho_min={rho_min:.4f}: {smallest}")
    return rho


def _mtime(model_dir: str | Path) -> int:
    return (Path(model_dir) / "config.json").stat().st_mtime_ns


@lru_cache(maxsize=32)
def _meta_model(model_dir: str, _mtime_ns: int, task: str, num_labels: int | None) -> nn.Module:
    """The base model on the meta device, as the run builds it for ``task`` (a classifier of
    ``num_labels``)."""
    from transformers import AutoModelForSequenceClassification

    with TRACE_LOCK:
        if task != "classification":
            return meta_model(model_dir)
        config = load_config(model_dir)
        config.num_labels = num_labels or 2
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
