"""The training methods, each one small class behind one interface (:class:`Method`), registered by name in
``greencore.registry``.

A method owns everything that is its own: which tensors train each epoch (``choose``), how it wraps the model
and puts a checkpoint back (``prepare``, ``weights_source``, ``restore``), what full fine-tuning of the same
model is (``full_baseline``), what a checkpoint of it holds (``export``), which budgets it takes (``check``,
``default_rho``) and what a run of it costs before it runs (``cost``). The trainer and the service never ask a
method's name.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from greencore import checkpoint
from greencore.importance import importance_pass
from greencore.lr import FULL_SCALE, LORA_SCALE, budget_scale
from greencore.memory import MemoryPlan
from greencore.profile import TensorProfile
from greencore.registry import MethodError, MethodInfo, budgeted_methods, method_info
from greencore.reselect import (
    EpochCosts,
    IntervalCosts,
    auto_every,
    auto_rho_min,
    fit_advice,
    interval_budgets,
    interval_costs,
    run_epochs,
    run_rho_min,
    selects,
)
from greencore.select import BudgetTooSmall, select_tensors
from greencore.spec import BUDGET_FIELDS, DEFAULT_RHO, BudgetSchedule, Hyperparameters, SpecError

__all__ = ["MethodError"]  # re-exported: callers catch it from here


@dataclass
class FirstStep:
    """The epoch's first training step, already computed while choosing: the chosen tensors' gradients of the
    loss on the epoch's first batch at the current weights, and that loss. The trainer applies it (clipping,
    optimizer, scheduler as for any step) and trains the epoch's other batches."""

    gradients: dict[str, torch.Tensor]
    loss: float


@dataclass
class Choice:
    """The tensors one epoch trains (names of the trained model's parameters) and what choosing them cost."""

    names: tuple[str, ...]
    selection_flops: int = 0  # FLOPs of the importance passes, counted in the epoch's budget
    details: dict[str, Any] = field(
        default_factory=dict
    )  # what the method wants recorded (k, objective, ...)
    first_step: FirstStep | None = None  # the first batch's step, when choosing computed it (green)


@dataclass
class EpochContext:
    """What a method sees at the start of an epoch."""

    epoch: int  # 1-based
    model: nn.Module
    profile: TensorProfile  # the epoch's steps combined: step_flops(mask) is the whole epoch's training FLOPs
    full_flops: int  # what full fine-tuning of the base model spends on the epoch's steps
    # True when the first step may come from the importance pass (one importance batch, and more steps after
    # it); ``loop_profile(True)`` is then the steps the trainer's loop runs after it, ``loop_profile(False)``
    # all of them.
    first_step_reusable: bool
    loop_profile: Callable[[bool], TensorProfile]
    later: Callable[[], list[tuple[TensorProfile, int]]]  # (combined profile, full FLOPs) of the later epochs
    # this choice covers (until the next selection)
    importance_batches: list[dict[str, torch.Tensor]]  # the epoch's first batches (as micro-batches), on the
    # training device
    importance_profile: TensorProfile  # those batches' steps combined
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    # Each importance batch's weight in the mean loss (None: equal); the training step's autocast; and a
    # context that holds the named tensors in float32 inside it (precision bf16 holds frozen ones in bf16).
    importance_weights: list[float] | None = None
    autocast: AbstractContextManager[Any] | None = None
    held_in_float32: Callable[[Iterable[str]], AbstractContextManager[None]] | None = None
    # Ranks holding shards (FSDP2): the sum over ranks of a list of numbers, for scores measured shard by
    # shard on every rank's rows (``importance_pass``'s ``sum_over_ranks``); None: one process holds it all.
    sum_over_ranks: Callable[[list[float]], list[float]] | None = None
    previous: tuple[str, ...] = ()  # the tensors the last epoch trained (none in the first)
    # Every epoch of the run, planned (``greencore.reselect.EpochCosts``): what a budget shared unevenly among
    # the epochs is computed from. None: only this epoch and ``later`` are known (every interval gets rho).
    run_epochs: Callable[[], list[EpochCosts]] | None = None


@dataclass(frozen=True)
class RunCosting:
    """What a method's cost is computed from, before the run: the base model (on the meta device) and the
    profiles of the run's planned epochs (``greencore.estimate``)."""

    model: nn.Module
    epochs: list[TensorProfile]  # per epoch: its steps combined
    importance: list[TensorProfile]  # per epoch: its importance batches combined
    hp: Hyperparameters
    # Per epoch: its steps less the first, where green's importance pass computes the first (else None).
    after_first: list[TensorProfile | None] = field(default_factory=list)
    # The same run planned with other hyperparameters, its dataset repeated ``repeat`` times: what a refusal
    # names as the way to fit (Method.advice). None where the costing cannot be replanned.
    replan: Callable[[Hyperparameters, int], RunCosting] | None = field(default=None, compare=False)
    examples: int = 0  # trained per epoch

    @property
    def full(self) -> int:
        """FLOPs of full fine-tuning over the whole run."""
        return sum(p.full.total for p in self.epochs)

    @property
    def rho_min(self) -> float:
        """The smallest rho that trains one tensor in every epoch, importance not counted."""
        return max(p.rho_min for p in self.epochs)


@dataclass(frozen=True)
class MethodCost:
    """A run's FLOPs for a method: ``flops`` None when it spends what its budget allows (rho x full)."""

    flops: int | None
    rho_min: float
    basis: str  # "profile": exact FLOPs of a fixed set; "budget": rho x full; "approximate"


@dataclass
class ModelExport:
    """What a checkpoint saves of the trained model: a Hugging Face model (its config, its save_pretrained),
    every tensor under the base's names, and anything else the method keeps (LoRA's adapter folder)."""

    hf_model: nn.Module
    tensors: dict[str, torch.Tensor]
    write_extra: Callable[[Path], None] | None = None


class Method(Protocol):
    info: MethodInfo

    def check(self) -> None:
        """Raise SpecError for hyperparameters this method cannot take (a budget for a fixed tensor set)."""
        ...

    @property
    def default_rho(self) -> float | None:
        """The rho it trains within when the job names no budget; None: it trains a fixed set of tensors."""
        ...

    @property
    def rho(self) -> float | None:
        """The rho it trains within: the job's, else its default."""
        ...

    def prepare(self, model: nn.Module, new_modules: list[str]) -> tuple[nn.Module, list[nn.Parameter]]:
        """The model to train (wrapped or not) and the parameters the optimizer holds.

        ``new_modules``: modules the base checkpoint did not have (a fresh classification head).
        """
        ...

    def weights_source(self, model_dir: str, resume_from: str | None) -> str:
        """The folder the model's weights are loaded from (a resumed run may continue from its
        checkpoint's)."""
        ...

    def restore(self, model: nn.Module, folder: str) -> None:
        """Put back, into the prepared model, what a checkpoint of this method holds beyond its weights."""
        ...

    def full_baseline(self, model: nn.Module) -> AbstractContextManager[None] | None:
        """A context in which ``model`` is the base model that full fine-tuning would train, for the FLOPs
        baseline; None when the trained model is that model already."""
        ...

    def choose(self, ctx: EpochContext) -> Choice | None:
        """The tensors to train this epoch, or None to keep the last choice."""
        ...

    def export(self, model: nn.Module) -> ModelExport:
        """The trained model as a checkpoint holds it: under the base's tensor names."""
        ...

    def cost(self, run: RunCosting) -> MethodCost:
        """The run's FLOPs and rho_min, before it runs."""
        ...

    def settle(self, run: RunCosting, rho: float | None) -> dict[str, Any]:
        """What it chooses for the run at the budget ``rho`` in force, among the hyperparameters the job left
        to it (green's automatic ``reselect_every``): hyperparameter name -> value."""
        ...

    def advice(self, run: RunCosting, rho: float) -> list[str]:
        """What would make a run refused at ``rho`` fit, each change with the rho_min it would give (none
        where only a larger rho would)."""
        ...

    def learning_rate_scale(self, run: RunCosting, rho: float | None, forward_share: float) -> float:
        """Its automatic learning rate over the reference rate (``greencore.lr``) for ``run`` at the budget
        ``rho`` in force, where the forward pass is ``forward_share`` of a full fine-tuning step's FLOPs: a
        function of the FLOPs share the run plans to spend (green: its rho; top-k: its layers' share)."""
        ...

    def memory_plan(self, run: RunCosting, rho: float | None) -> MemoryPlan:
        """What the run holds, for its peak memory before it runs (``greencore.memory``): the model it trains,
        the tensors that train (an upper bound where the selection is made during the run) and the
        importance evaluation's candidates, at the budget ``rho`` in force."""
        ...


def make_method(name: str, hp: Hyperparameters) -> Method:
    """The method registered under ``name``; unknown names are refused (MethodError)."""
    info = method_info(name)
    module, _, cls = info.implementation.partition(":")
    return getattr(importlib.import_module(module), cls)(info, hp)


def _refuse_budget(info: MethodInfo, hp: Hyperparameters, why: str | None = None) -> None:
    """SpecError when ``hp`` names a budget (rho, max_flops, max_energy_kwh): ``info``'s method trains a fixed
    set of tensors."""
    if any(getattr(hp, name) is not None for name in BUDGET_FIELDS):
        methods = " and ".join(budgeted_methods())
        generic = f"rho, max_flops and max_energy_kwh apply to methods {methods}, not {info.name}"
        raise SpecError("hyperparameters", why or generic)


def _refuse_schedule(info: MethodInfo, hp: Hyperparameters) -> None:
    """SpecError when ``hp`` asks for an uneven budget schedule of a method that selects once (or never)."""
    if hp.budget_schedule != BudgetSchedule.EVEN:
        raise SpecError(
            "budget_schedule",
            f"{hp.budget_schedule} applies to green only (its selections share the run's rho), "
            f"not {info.name}",
        )


class _InPlace:
    """What the methods that train the base's own tensors share (full, green, topk): the model as loaded,
    every parameter held by the optimizer (only the chosen ones get gradients), checkpoints of the model
    itself."""

    info: MethodInfo

    def __init__(self, info: MethodInfo, hp: Hyperparameters) -> None:
        self.info = info
        self.hp = hp

    schedules_budget = False  # shares its rho unevenly among the epochs when asked (budget_schedule)

    def check(self) -> None:
        if not self.info.budgeted:
            _refuse_budget(self.info, self.hp)
        if not self.schedules_budget:
            _refuse_schedule(self.info, self.hp)

    @property
    def default_rho(self) -> float | None:
        return DEFAULT_RHO if self.info.budgeted else None

    @property
    def rho(self) -> float | None:
        return self.hp.rho if self.hp.rho is not None else self.default_rho

    def prepare(self, model: nn.Module, new_modules: list[str]) -> tuple[nn.Module, list[nn.Parameter]]:
        return model, list(model.parameters())

    def weights_source(self, model_dir: str, resume_from: str | None) -> str:
        return resume_from or model_dir

    def restore(self, model: nn.Module, folder: str) -> None:
        checkpoint.restore_master_weights(model, folder)

    def full_baseline(self, model: nn.Module) -> AbstractContextManager[None] | None:
        return None

    def export(self, model: nn.Module) -> ModelExport:
        return ModelExport(model, model.state_dict())

    def advice(self, run: RunCosting, rho: float) -> list[str]:
        return []

    def settle(self, run: RunCosting, rho: float | None) -> dict[str, Any]:
        return {}

    def memory_plan(self, run: RunCosting, rho: float | None) -> MemoryPlan:
        return MemoryPlan(run.model, tuple(n for n, _ in run.model.named_parameters()))


class FullMethod(_InPlace):
    """Every tensor trains."""

    def choose(self, ctx: EpochContext) -> Choice | None:
        return Choice(ctx.profile.names) if ctx.epoch == 1 else None

    def cost(self, run: RunCosting) -> MethodCost:
        return MethodCost(run.full, run.rho_min, "profile")

    def learning_rate_scale(self, run: RunCosting, rho: float | None, forward_share: float) -> float:
        return FULL_SCALE


class GreenMethod(_InPlace):
    """GreenTrainer: at the start and every ``reselect_every`` epochs, measure each tensor's importance on the
    epoch's first batch(es) (of median size: ``greencore.data.epoch_batches``; ``importance_rows`` of each)
    and train the tensors that maximise it within ``rho`` of full fine-tuning FLOPs over the epochs the
    selection serves, the importance passes included (``greencore.reselect``).

    Measured on one whole batch, the importance pass's first gradients are the epoch's first training step for
    the tensors chosen (the gradient of a tensor does not depend on which others train): that step is kept
    (``Choice.first_step``) rather than computed again, so the budget pays the importance passes and the
    epoch's other steps. It differs from a loop step only in running without dropout, in float32.
    """

    schedules_budget = True
    _budgets: list[float] | None = None  # each interval's rho under budget_schedule, planned at the first

    def choose(self, ctx: EpochContext) -> Choice | None:
        every = self.hp.reselect_every or 1  # greencore.train settles an automatic one first (settings)
        if not selects(ctx.epoch, every):
            return None
        keep_first = ctx.first_step_reusable
        first = EpochCosts(
            ctx.profile,
            ctx.loop_profile(True) if keep_first else None,
            ctx.full_flops,
            ctx.importance_profile,
        )
        interval = IntervalCosts.of(first, ctx.later())
        loop, rho = interval.loop, self.rho
        if self.hp.budget_schedule != BudgetSchedule.EVEN and ctx.run_epochs is not None:
            if self._budgets is None:  # the run's plan, once: it is the same at every selection
                self._budgets = interval_budgets(ctx.run_epochs(), every, rho, self.hp.budget_schedule)
            rho = self._budgets[(ctx.epoch - 1) // every]
        # Only tensors that could train within the budget are worth measuring, and measuring fewer (shallower)
        # tensors costs less backward.
        candidates, spent = interval.candidates(rho)
        if not candidates:
            raise BudgetTooSmall(
                rho,
                interval.rho_min(),
                "the cheapest tensor's steps and the importance pass that measures it do not fit "
                f"{rho} of full fine-tuning ({interval.full:.3e} FLOPs) over the epochs the selection serves",
            )
        widened = ctx.held_in_float32(candidates) if ctx.held_in_float32 else contextlib.nullcontext()
        with widened:
            measured = importance_pass(
                ctx.model,
                ctx.importance_batches,
                ctx.optimizer_factory,
                names=candidates,
                weights=ctx.importance_weights,
                autocast=ctx.autocast,
                sum_over_ranks=ctx.sum_over_ranks,
            )
        importance = measured.scores
        target, reserved = interval.selection_budget(rho, spent)
        # The choice must fit the whole interval, importance included; guard the float rounding of the target.
        for _ in range(20):
            sel = select_tensors(loop, importance, target, reserved_flops=reserved)
            chosen = sel.names
            spends = (loop.step_flops(chosen).total + spent) / interval.full
            if spends <= rho:
                break
            target *= (rho / spends) * (1 - 1e-6)
        else:
            raise MethodError(f"no selection fits rho={rho} over the epochs it serves")
        first_step = None
        if keep_first and chosen:
            first_step = FirstStep({n: measured.gradients[n] for n in chosen}, measured.loss)
        ranked = sorted(importance.items(), key=lambda kv: -kv[1])
        details = {
            "objective": sel.objective,
            "target_rho": target * loop.full.total / interval.full,
            "importance_top": ranked[:5],
            # The epochs this selection serves: their FLOPs together, importance included, keep rho.
            "serves_epochs": [ctx.epoch, ctx.epoch + len(ctx.later())],
            "candidates": len(candidates),
            "interval_rho": rho,  # the budget of this selection's epochs (budget_schedule)
        }
        return Choice(chosen, spent, details, first_step)

    def cost(self, run: RunCosting) -> MethodCost:
        epochs = run_epochs(run)
        every = self.hp.reselect_every
        return MethodCost(None, run_rho_min(epochs, every) if every else auto_rho_min(epochs), "budget")

    def settle(self, run: RunCosting, rho: float | None) -> dict[str, Any]:
        every = self.hp.reselect_every or auto_every(run_epochs(run), rho or self.rho or 1.0)
        return {"reselect_every": every}

    def advice(self, run: RunCosting, rho: float) -> list[str]:
        return fit_advice(run, rho)

    def learning_rate_scale(self, run: RunCosting, rho: float | None, forward_share: float) -> float:
        # It spends its budget, importance included, whatever its schedule among the epochs.
        return budget_scale(rho or self.rho or 1.0, forward_share)

    def memory_plan(self, run: RunCosting, rho: float | None) -> MemoryPlan:
        # The selection changes every reselection and is unknown before the run: bound it by every tensor a
        # selection could measure (choose's candidates: a selection trains some of them), each trained and
        # holding AdamW state at once (the optimizer keeps the state of every tensor trained so far).
        epochs = run_epochs(run)
        budget = min(1.0, rho or self.rho or 1.0)
        every = self.hp.reselect_every or auto_every(epochs, budget)
        budgets = interval_budgets(epochs, every, budget, self.hp.budget_schedule)
        reach: set[str] = set()
        for interval, spends in zip(interval_costs(epochs, every), budgets, strict=True):
            reach |= set(interval.candidates(spends)[0])
        names = tuple(n for n in run.epochs[0].names if n in reach)
        return MemoryPlan(run.model, names, names, "bound")


def transformer_layers(model: nn.Module) -> list[list[str]]:
    """Parameter names of each repeated block (transformer layer), in model order.

    A layer list is an ``nn.ModuleList`` of two or more modules of one class holding parameters; lists inside
    such a layer (or inside another list) are parts of it. Encoder-decoders give the encoder's blocks, then
    the decoder's.
    """
    lists: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1 or not any(True for _ in module.parameters()):
            continue
        if any(name.startswith(outer + ".") for outer in lists):
            continue
        lists.append(name)
    layers: list[list[str]] = []
    names = [n for n, _ in model.named_parameters()]
    for outer in lists:
        container = model.get_submodule(outer)
        for i in range(len(container)):
            prefix = f"{outer}.{i}." if outer else f"{i}."
            layers.append([n for n in names if n.startswith(prefix)])
    order = {n: i for i, n in enumerate(names)}
    return sorted((layer for layer in layers if layer), key=lambda layer: order[layer[0]])


def top_layers(profile: TensorProfile, layers: list[list[str]], k: int) -> tuple[str, ...]:
    """The tensors of the top ``k`` layers plus the head: the tensors after the last layer in model order
    (final norm, classifier, an untied output projection). A tied output embedding counts as the input one."""
    index = {n: i for i, n in enumerate(profile.names)}
    in_layers = {n for layer in layers for n in layer}
    last = max((index[n] for n in in_layers if n in index), default=-1)
    head = [n for n in profile.names if index[n] > last and n not in in_layers]
    chosen = [n for layer in layers[len(layers) - k :] for n in layer if n in index] if k else []
    return tuple(n for n in profile.names if n in set(chosen) | set(head))


class TopKMethod(_InPlace):
    """The paper's baseline: train the top k transformer layers and the head; k from the hyperparameters, or
    the largest k whose FLOPs fit rho."""

    def check(self) -> None:
        super().check()
        if self.hp.topk_layers is not None:
            _refuse_budget(
                self.info,
                self.hp,
                "topk takes topk_layers or a budget (rho, max_flops, max_energy_kwh), not both",
            )

    @property
    def default_rho(self) -> float | None:
        return DEFAULT_RHO if self.hp.topk_layers is None else None

    def prepare(self, model: nn.Module, new_modules: list[str]) -> tuple[nn.Module, list[nn.Parameter]]:
        self.layers = _layers_of(model)
        return model, list(model.parameters())

    def choose(self, ctx: EpochContext) -> Choice | None:
        if ctx.epoch != 1:
            return None
        n = len(self.layers)
        if self.hp.topk_layers is not None:
            k = min(self.hp.topk_layers, n)
            return Choice(top_layers(ctx.profile, self.layers, k), 0, {"k": k, "layers": n})
        rho = self.rho
        for k in range(n, -1, -1):
            chosen = top_layers(ctx.profile, self.layers, k)
            if chosen and ctx.profile.step_flops(chosen).total <= rho * ctx.full_flops:
                return Choice(chosen, 0, {"k": k, "layers": n})
        head = top_layers(ctx.profile, self.layers, 0)
        rho_min = ctx.profile.step_flops(head).total / ctx.full_flops if head else 1.0
        raise BudgetTooSmall(rho, rho_min)

    def cost(self, run: RunCosting) -> MethodCost:
        layers = transformer_layers(run.model)
        head = top_layers(run.epochs[0], layers, 0) if layers else ()
        rho_min = max(p.step_flops(head).total / p.full.total for p in run.epochs) if head else 1.0
        if self.hp.topk_layers is None:
            return MethodCost(None, rho_min, "budget")
        chosen = self._planned(run, None)
        return MethodCost(sum(p.step_flops(chosen).total for p in run.epochs), rho_min, "profile")

    def learning_rate_scale(self, run: RunCosting, rho: float | None, forward_share: float) -> float:
        # The share its layers spend, not its budget's: the largest k within rho may spend well below rho
        # (all-MiniLM-L6-v2 at 0.5: 0.431, a scale of x24 rather than x10).
        chosen = self._planned(run, rho)
        share = sum(p.step_flops(chosen).total for p in run.epochs) / run.full if chosen else 1.0
        return budget_scale(share, forward_share)

    def memory_plan(self, run: RunCosting, rho: float | None) -> MemoryPlan:
        return MemoryPlan(run.model, self._planned(run, rho))

    def _planned(self, run: RunCosting, rho: float | None) -> tuple[str, ...]:
        """The tensors the run will train: choose's rule on the first epoch's profile (the choice holds for
        the run); none where no k fits ``rho``."""
        layers = transformer_layers(run.model)
        profile = run.epochs[0]
        if self.hp.topk_layers is not None:
            return top_layers(profile, layers, min(self.hp.topk_layers, len(layers)))
        for k in range(len(layers), -1, -1):
            chosen = top_layers(profile, layers, k)
            if chosen and profile.step_flops(chosen).total <= (rho or 1.0) * profile.full.total:
                return chosen
        return ()


def _layers_of(model: nn.Module) -> list[list[str]]:
    layers = transformer_layers(model)
    if not layers:
        raise MethodError("topk needs a model with repeated layers (an nn.ModuleList of blocks); none found")
    return layers


def attention_projections(model: nn.Module) -> list[str]:
    """Full names of the linear projections inside the model's attention blocks, in model order.

    An attention block is a module whose class name says it is one (``...Attention``, ``...SelfAttention``);
    its projections are the ``nn.Linear`` (or transformers' GPT-2 style ``Conv1D``) modules inside it.
    """
    from transformers.pytorch_utils import Conv1D

    found: list[str] = []
    for name, module in model.named_modules():
        if "attention" not in type(module).__name__.lower() or isinstance(module, nn.Linear | Conv1D):
            continue
        for sub, child in module.named_modules():
            full = f"{name}.{sub}" if name and sub else name or sub
            if isinstance(child, nn.Linear | Conv1D) and full not in found:
                found.append(full)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(found, key=order.__getitem__)


class LoraMethod:
    """LoRA (peft): rank-``lora_r`` adapters with scaling ``lora_alpha / lora_r`` on the attention
    projections; only the adapters (and a fresh classification head) train. A checkpoint holds the base with
    the adapters merged (computed out of place: the trained model is never copied nor changed) and the adapter
    folder."""

    def __init__(self, info: MethodInfo, hp: Hyperparameters) -> None:
        self.info = info
        self.hp = hp

    def check(self) -> None:
        _refuse_budget(self.info, self.hp)
        _refuse_schedule(self.info, self.hp)

    @property
    def default_rho(self) -> float | None:
        return None

    @property
    def rho(self) -> float | None:
        return self.hp.rho  # None, where check() was asked (the service asks)

    def prepare(self, model: nn.Module, new_modules: list[str]) -> tuple[nn.Module, list[nn.Parameter]]:
        from peft import LoraConfig, get_peft_model
        from transformers.pytorch_utils import Conv1D

        targets = attention_projections(model)
        if not targets:
            raise MethodError("lora found no linear projection inside an attention block of this model")
        config = LoraConfig(
            r=self.hp.lora_r,
            lora_alpha=self.hp.lora_alpha,
            lora_dropout=0.0,  # dropout would make the adapters' FLOPs differ from the profile's
            target_modules=targets,
            # GPT-2 style Conv1D stores its weight transposed (in x out).
            fan_in_fan_out=isinstance(model.get_submodule(targets[0]), Conv1D),
            modules_to_save=new_modules or None,
        )
        wrapped = get_peft_model(model, config)
        return wrapped, [p for p in wrapped.parameters() if p.requires_grad]

    def weights_source(self, model_dir: str, resume_from: str | None) -> str:
        return model_dir  # the base: the adapter is put back after wrapping

    def restore(self, model: nn.Module, folder: str) -> None:
        checkpoint.restore_adapter(model, folder)

    def full_baseline(self, model: nn.Module) -> AbstractContextManager[None] | None:
        return model.disable_adapter()  # the same model with its adapters switched off

    def advice(self, run: RunCosting, rho: float) -> list[str]:
        return []

    def settle(self, run: RunCosting, rho: float | None) -> dict[str, Any]:
        return {}

    def choose(self, ctx: EpochContext) -> Choice | None:
        if ctx.epoch != 1:
            return None
        trainable = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
        return Choice(tuple(n for n in ctx.profile.names if n in trainable))

    def export(self, model: nn.Module) -> ModelExport:
        base = model.get_base_model()
        adapter = model

        def write_adapter(folder: Path) -> None:
            adapter.save_pretrained(folder / checkpoint.ADAPTER_DIR)

        return ModelExport(base, merged_tensors(base), write_adapter)

    def cost(self, run: RunCosting) -> MethodCost:
        # Adapters are tiny: the run pays the forward and the activation gradients down to the lowest
        # projection; the adapters' own FLOPs are not in the base model's profile.
        names = [f"{m}.weight" for m in attention_projections(run.model)]
        names = [n for n in names if n in run.epochs[0].names]
        flops = sum(p.fwd + p.step_flops(names).bwd_act for p in run.epochs) if names else run.full
        return MethodCost(flops, run.rho_min, "approximate")

    def learning_rate_scale(self, run: RunCosting, rho: float | None, forward_share: float) -> float:
        return LORA_SCALE

    def memory_plan(self, run: RunCosting, rho: float | None) -> MemoryPlan:
        # The model as this method wraps it (its adapters), on a copy.
        import copy

        from greencore.models import TRACE_LOCK

        with TRACE_LOCK:
            base = copy.deepcopy(run.model)
        # A fresh classification head (hidden x labels, which peft would also train) is left out: the base
        # model alone does not say whether its checkpoint has one.
        wrapped, _ = self.prepare(base, [])
        trained = tuple(n for n, p in wrapped.named_parameters() if p.requires_grad)
        return MemoryPlan(wrapped, trained)


def merged_tensors(base: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a peft-wrapped model with its LoRA adapters merged, under the base's names: what
    ``merge_and_unload`` would leave, computed out of place (``W + delta`` equals peft's in-place
    ``W += delta`` bit for bit), so the trained model is neither copied nor changed. Merging in place and
    unmerging after would leave ``W + delta - delta``, which is not ``W`` in floating point."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    lora = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    wrappers = {name: m for name, m in base.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in base.state_dict().items():
            parts = key.split(".")
            if any(p.startswith("lora_") for p in parts):
                continue  # the adapter itself: merged below
            module = key.rsplit(".", 1)[0]
            owner = next((w for w in wrappers if key.startswith(w + ".")), None)
            if owner is not None:  # a module trained whole (a fresh head): the trained copy replaces it
                active = f"{owner}.modules_to_save.{wrappers[owner].active_adapter}."
                if not key.startswith(active):
                    continue
                key = owner + "." + key[len(active) :]
            elif module.endswith(".base_layer") and module[: -len(".base_layer")] in lora:
                layer = lora[module[: -len(".base_layer")]]
                key = key.replace(".base_layer.", ".")
                if key.endswith(".weight"):
                    for name in layer.active_adapters:
                        value = value + layer.get_delta_weight(name)
            out[key] = value
    return out
