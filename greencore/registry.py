"""The training methods a job can ask for, by name: the one list the API's schema, the CLI's choices and the
dashboard read. Importing it costs nothing (no torch): the classes live in ``greencore.methods`` and are
imported when a run makes one (:func:`greencore.methods.make_method`).

Adding a method: write its class (it follows ``greencore.methods.Method``), then register it here.
"""

from __future__ import annotations

from dataclasses import dataclass


class MethodError(ValueError):
    """A method that cannot run as asked (unknown name, a budget it cannot meet)."""


@dataclass(frozen=True)
class MethodInfo:
    name: str  # what a job names in ``method``
    title: str  # a label for people (the dashboard)
    summary: str  # what it trains, in one line
    budgeted: bool  # takes a FLOPs budget (rho, max_flops, max_energy_kwh)
    implementation: str  # "module:Class" of its greencore.methods.Method


METHODS: dict[str, MethodInfo] = {}
DEFAULT_METHOD = "green"  # what a job that names no method runs
# Other names a job may use: OpenAI's "supervised" fine-tuning is GreenTrainer at its default budget.
ALIASES: dict[str, str] = {"supervised": DEFAULT_METHOD}


def register_method(info: MethodInfo) -> MethodInfo:
    """Add a method to the registry; a name registered twice is refused."""
    if info.name in METHODS:
        raise MethodError(f"method {info.name!r} is registered already")
    METHODS[info.name] = info
    return info


def method_info(name: str) -> MethodInfo:
    """The registered method ``name`` (or the one an alias stands for); MethodError naming the known ones
    otherwise."""
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; one of {', '.join(method_names())}")
    return METHODS[name]


def method_names() -> list[str]:
    """Every name a job may give: the aliases, then the registered methods."""
    return [*ALIASES, *METHODS]


def budgeted_methods() -> list[str]:
    """Names of the methods that take a FLOPs budget."""
    return [name for name, info in METHODS.items() if info.budgeted]


register_method(
    MethodInfo(
        "green",
        "GreenTrainer",
        "trains the tensors that buy the most loss reduction per FLOP, within rho",
        True,
        "greencore.methods:GreenMethod",
    )
)
register_method(
    MethodInfo(
        "full",
        "Full fine-tuning",
        "trains every tensor; the baseline the savings are measured against",
        False,
        "greencore.methods:FullMethod",
    )
)
register_method(
    MethodInfo(
        "lora",
        "LoRA",
        "low-rank adapters on the attention projections",
        False,
        "greencore.methods:LoraMethod",
    )
)
register_method(
    MethodInfo(
        "topk",
        "Top layers",
        "trains the top layers that fit within rho",
        True,
        "greencore.methods:TopKMethod",
    )
)
