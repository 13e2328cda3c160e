"""The training methods a job can ask for, each one small class behind one interface, registered by name.

A method decides which tensors train. ``prepare`` may wrap the model (LoRA) and returns the parameters the
optimizer holds; ``choose`` is called at the start of every epoch and returns the tensors to train in it, with
the FLOPs spent choosing them (GreenTrainer's importance passes), or None to keep the previous choice.
Everything else (FLOPs accounting, the loop, checkpoints) is the same for every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from greencore.importance import importance_flops, importance_pass
from greencore.profile import TensorProfile
from greencore.select import BudgetTooSmall, reachable_tensors, select_tensors
from greencore.spec import Hyperparameters

DEFAULT_RHO = 0.5  # share of full fine-tuning FLOPs green and topk get when the job names neither rho nor k


class MethodError(ValueError):
    """A method that cannot run as asked (unknown name, a budget it cannot meet)."""


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
    rest_profile: TensorProfile | None  # the epoch's steps after the first, combined; None when the epoch has
    # one batch or importance runs on several (the first step cannot then come from the importance pass)
    full_flops: int  # what full fine-tuning of the base model spends on the epoch's steps
    later: Callable[[], list[tuple[TensorProfile, int]]]  # (combined profile, full FLOPs) of the later epochs
    # this choice covers (until the next selection)
    importance_batches: list[dict[str, torch.Tensor]]  # the epoch's first batches, on the training device
    importance_profiles: list[TensorProfile]  # the profile of each of those batches' shape
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class Method(Protocol):
    name: str

    def prepare(self, model: nn.Module, new_modules: list[str]) -> tuple[nn.Module, list[nn.Parameter]]:
        """The model to train (wrapped or not) and the parameters the optimizer holds.

        ``new_modules``: modules the base checkpoint did not have (a fresh classification head).
        """
        ...

    def choose(self, ctx: EpochContext) -> Choice | None:
        """The tensors to train this epoch, or None to keep the last choice."""
        ...


def _all_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())


class FullMethod:
    """Every tensor trains."""

    name = "full"

    def __init__(self, hp: Hyperparameters) -> None:
        self.hp = hp

    def prepare(self, model: nn.Module, new_modules: list[str]) -> tuple[nn.Module, list[nn.Parameter]]:
        return model, _all_parameters(model)

    def choose(self, ctx: EpochContext) -> Choice | None:
        return Choice(ctx.profile.names) if ctx.epoch == 1 else None


def rho_of(hp: Hyperparameters) -> float:
    return hp.rho if hp.rho is not None else DEFAULT_RHO


class GreenMethod:
    """GreenTrainer: at the start and every ``reselect_every`` epochs, measure each tensor's importance on the
    epoch's first batch(es) (of median size: ``greencore.data.epoch_batches``) and train the tensors that
    maximise it within ``rho`` of full fine-tuning FLOPs, the importance passes included.

    Measured on one batch, the importance pass's first gradients are the epoch's first training step for the
    tensors chosen (the gradient of a tensor does not depend on which others train): that step is kept
    (``Choice.first_step``) rather than computed again, so the budget pays the importance passes and the
    epoch's other steps. It differs from a loop step only in running without dropout, in float32.
    """

    name = "green"

    def __init__(self, hp: Hyperparameters) -> None:
        self.hp = hp
        self.rho = rho_of(hp)

    def prepare(self, model: nn.Module, new_modules: list[str]) -> tuple[nn.Module, list[nn.Parameter]]:
        return model, _all_parameters(model)

    def choose(self, ctx: EpochContext) -> Choice | None:
        if (ctx.epoch - 1) % self.hp.reselect_every:
            return None
        keep_first = ctx.rest_profile is not None
        loop = ctx.rest_profile if keep_first else ctx.profile  # the steps the trainer's loop will run
        # Budgets on ``loop`` are shares of its own full FLOPs; the job's rho is a share of the whole epoch's.
        scale = ctx.full_flops / loop.full.total
        target = min(1.0, self.rho * scale)
        try:
            # Only tensors that could train within the budget on their own are worth measuring, and measuring
            # fewer (shallower) tensors costs less backward.
            candidates = reachable_tensors(loop, target)
            measured = importance_pass(
                ctx.model, ctx.importance_batches, ctx.optimizer_factory, names=candidates
            )
            importance = measured.scores
            spent = sum(importance_flops(p, candidates, 1).total for p in ctx.importance_profiles)
            # The choice must fit every epoch it covers. Epochs differ a little in their shapes, so a choice that
            # fits the first may overrun a later one by a hair: tighten the target until all fit.
            epochs = [(loop, ctx.full_flops, spent)] + [(p, f, 0) for p, f in ctx.later()]
            for _ in range(20):
                sel = select_tensors(loop, importance, target, reserved_flops=spent)
                chosen = sel.names
                worst = max((p.step_flops(chosen).total + s) / f for p, f, s in epochs)
                if worst <= self.rho:
                    break
                target *= (self.rho / worst) * (1 - 1e-6)
            else:
                raise MethodError(
                    f"no selection fits rho={self.rho} in every epoch of the reselection interval"
                )
        except BudgetTooSmall as exc:  # its rho_min is a share of the loop's FLOPs: restate it as the epoch's
            raise BudgetTooSmall(self.rho, exc.rho_min / scale, exc.detail) from exc
        first = None
        if keep_first and chosen:
            first = FirstStep({n: measured.gradients[n] for n in chosen}, measured.loss)
        ranked = sorted(importance.items(), key=lambda kv: -kv[1])
        return Choice(
            chosen,
            spent,
            {"objective": sel.objective, "target_rho": target / scale, "importance_top": ranked[:5]},
            first,
        )


def transformer_layers(model: nn.Module) -> list[list[str]]:
    """Parameter names of each repeated block (transformer layer), in model order.

    A layer list is an ``nn.ModuleList`` of two or more modules of one class holding parameters; lists inside
    such a layer (or inside another list) are parts of it. Encoder-decoders give the encoder's blocks, then the
    decoder's.
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


class TopKMethod:
    """The paper's baseline: train the top k transformer layers and the head; k from the hyperparameters, or the
    largest k whose FLOPs fit rho."""

    name = "topk"

    def __init__(self, hp: Hyperparameters) -> None:
        self.hp = hp

    def prepare(self, model: nn.Module, new_modules: list[str]) -> tuple[nn.Module, list[nn.Parameter]]:
        self.layers = transformer_layers(model)
        if not self.layers:
            raise MethodError(
                "topk needs a model with repeated layers (an nn.ModuleList of blocks); none found"
            )
        return model, _all_parameters(model)

    def choose(self, ctx: EpochContext) -> Choice | None:
        if ctx.epoch != 1:
            return None
        n = len(self.layers)
        if self.hp.topk_layers is not None:
            k = min(self.hp.topk_layers, n)
            return Choice(top_layers(ctx.profile, self.layers, k), 0, {"k": k, "layers": n})
        rho = rho_of(self.hp)
        for k in range(n, -1, -1):
            chosen = top_layers(ctx.profile, self.layers, k)
            if chosen and ctx.profile.step_flops(chosen).total <= rho * ctx.full_flops:
                return Choice(chosen, 0, {"k": k, "layers": n})
        head = top_layers(ctx.profile, self.layers, 0)
        rho_min = ctx.profile.step_flops(head).total / ctx.full_flops if head else 1.0
        raise BudgetTooSmall(rho, rho_min)


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
    """LoRA (peft): rank-``lora_r`` adapters with scaling ``lora_alpha / lora_r`` on the attention projections;
    only the adapters (and a fresh classification head) train."""

    name = "lora"

    def __init__(self, hp: Hyperparameters) -> None:
        self.hp = hp

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

    def choose(self, ctx: EpochContext) -> Choice | None:
        if ctx.epoch != 1:
            return None
        trainable = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
        return Choice(tuple(n for n in ctx.profile.names if n in trainable))


METHODS: dict[str, type] = {m.name: m for m in (GreenMethod, FullMethod, LoraMethod, TopKMethod)}


def make_method(name: str, hp: Hyperparameters) -> Method:
    """The method registered under ``name``; unknown names are refused."""
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; one of {', '.join(METHODS)}")
    return METHODS[name](hp)
