"""What a job costs before it runs, and the budget (rho) a job's hyperparameters put in force.

The dataset is tokenized with the model's tokenizer exactly as the training run will (greencore.data), the
epochs are cut into batches in the run's order (``epoch_batches``, seeded) and padded as the run pads them
(``batch_shape``); each distinct padded shape is profiled once (``profile_model`` on the meta device, batch 1:
FLOPs are linear in the batch), and an epoch's profile is the sum of its batches' (``TensorProfile.combine``).
Time and energy follow from FLOPs on the configured device profile: ``time_s = flops / (peak * utilization)``,
``energy_j = time_s * watts``, ``gco2e = kWh * intensity * PUE``.

Everything but the budget is cached by (model folder and its mtime, file and its SHA-256, the
hyperparameters that shape the run, seed): creating a job after estimating it costs no second profile.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from api.catalog import TRACE_LOCK, ModelCatalog, tokenizer_at
from api.config import Settings
from api.datasets import inspect_dataset
from api.errors import BudgetTooSmallError, DatasetInvalid, InvalidRequest
from api.schemas.estimates import (
    DeviceProfile,
    EstimatePublic,
    FlopsFullAndMethod,
    FullAndMethod,
    MinimumBudget,
)
from api.schemas.jobs import BUDGET_FIELDS, Hyperparameters
from api.tables import File

J_PER_KWH = 3.6e6
DEFAULT_RHO = 0.5  # greencore.methods.DEFAULT_RHO: green and topk without rho, max_flops or max_energy_kwh
Shapes = tuple[tuple[tuple[int, ...], int], ...]  # ((padded shape without the batch dimension, rows), ...)


@dataclass(frozen=True)
class DatasetPlan:
    """A dataset as the run will batch it."""

    task: str
    examples: int
    tokens: int  # per epoch
    truncated: int
    num_labels: int | None
    steps_per_epoch: int
    epochs: tuple[Shapes, ...]  # per epoch: every batch
    importance: tuple[Shapes, ...]  # per epoch: the first batches, which GreenTrainer's importance runs on


@dataclass(frozen=True)
class RunCosts:
    """Whole-run FLOPs of full fine-tuning and of the method; ``method`` None when the method spends what its
    budget allows (green, topk by rho): rho x full."""

    plan: DatasetPlan
    full: int
    method: int | None
    rho_min: float
    basis: str


@lru_cache(maxsize=32)
def _encoded(
    model_path: str, mtime: int, file_path: str, _sha256: str, max_seq_len: int
) -> tuple[Any, int | None]:
    from greencore.data import PROMPT_COMPLETION, DatasetError, encode_dataset, task_for
    from greencore.models import load_config

    summary = inspect_dataset(Path(file_path))
    config = load_config(model_path)
    task = task_for(summary.format, config)
    if task == "classification" and getattr(config, "is_encoder_decoder", False):
        raise InvalidRequest(
            "text/label data trains a classifier: pick a model that is not encoder-decoder", param="model"
        )
    label2id = {name: i for i, name in enumerate(summary.labels)} if summary.labels else None
    try:
        encoded = encode_dataset(summary, tokenizer_at(model_path, mtime), task, max_seq_len, label2id)
    except DatasetError as exc:
        raise DatasetInvalid(exc.message, exc.line, exc.field) from exc
    if encoded.dropped_lines:  # refused rather than silently left out of the run
        first, more = encoded.dropped_lines[0], len(encoded.dropped_lines) - 1
        field, learned = (
            ("completion",) * 2 if summary.format == PROMPT_COMPLETION else ("messages", "assistant")
        )
        raise DatasetInvalid(
            f"no {learned} token is left to learn from within max_seq_len={max_seq_len} tokens"
            f"{f' (nor in {more} more lines)' if more else ''}: shorten the example or raise max_seq_len",
            first,
            field,
        )
    return encoded, (len(summary.labels) if summary.labels else None)


def plan_dataset(
    model_path: str, mtime: int, file_path: str, sha256: str, hp: Hyperparameters, seed: int
) -> DatasetPlan:
    """Tokenize (cached) and batch a dataset for ``hp.n_epochs`` epochs as the run will."""
    from greencore.data import batch_shape, epoch_batches

    encoded, num_labels = _encoded(model_path, mtime, file_path, sha256, hp.max_seq_len)
    epochs, importance = [], []
    for epoch in range(1, hp.n_epochs + 1):
        rows: Counter[tuple[int, ...]] = Counter()
        batches = epoch_batches(encoded, hp.batch_size, seed, epoch, hp.max_seq_len, hp.importance_batches)
        shapes = [batch_shape(encoded, idx, hp.max_seq_len) for idx in batches]
        for shape in shapes:
            rows[shape[1:]] += shape[0]
        epochs.append(tuple(sorted(rows.items())))
        importance.append(tuple((shape[1:], shape[0]) for shape in shapes[: hp.importance_batches]))
    return DatasetPlan(
        task=encoded.task,
        examples=len(encoded),
        tokens=sum(len(ids) for ids in encoded.input_ids),
        truncated=encoded.truncated,
        num_labels=num_labels,
        steps_per_epoch=-(-len(encoded) // hp.batch_size),
        epochs=tuple(epochs),
        importance=tuple(importance),
    )


def _meta_model(model_path: str, task: str, num_labels: int | None) -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification

    from greencore.models import load_config, meta_model

    if task != "classification":
        return meta_model(model_path)
    config = load_config(model_path)
    config.num_labels = num_labels or 2
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


@lru_cache(maxsize=512)
def _shape_profile(
    model_path: str, _mtime: int, task: str, num_labels: int | None, shape: tuple[int, ...]
) -> Any:
    from greencore.profile import profile_model

    with TRACE_LOCK:
        model = _meta_model(model_path, task, num_labels)
        return profile_model(model, 1, shape[0], shape[1] if len(shape) > 1 else None)


@lru_cache(maxsize=32)
def _layers(
    model_path: str, _mtime: int, task: str, num_labels: int | None
) -> tuple[list[list[str]], list[str]]:
    from greencore.methods import attention_projections, transformer_layers

    with TRACE_LOCK:
        model = _meta_model(model_path, task, num_labels)
    return transformer_layers(model), [f"{m}.weight" for m in attention_projections(model)]


def _cheapest(profile: Any) -> int:
    """FLOPs of the cheapest step that trains one tensor."""
    return min(profile.step_flops_bits(1 << i).total for i in range(len(profile.names)))


@lru_cache(maxsize=256)
def _run_costs(
    model_path: str, mtime: int, file_path: str, sha256: str, method: str, hp_json: str, seed: int
) -> RunCosts:
    from greencore.methods import top_layers
    from greencore.profile import TensorProfile

    hp = Hyperparameters.model_validate_json(hp_json)
    plan = plan_dataset(model_path, mtime, file_path, sha256, hp, seed)

    def profile_of(shape: tuple[int, ...]) -> Any:
        return _shape_profile(model_path, mtime, plan.task, plan.num_labels, shape)

    profiles = [
        TensorProfile.combine((profile_of(shape), rows) for shape, rows in epoch) for epoch in plan.epochs
    ]
    full = sum(p.full.total for p in profiles)
    rho_min = max(p.rho_min for p in profiles)
    if method == "full":
        return RunCosts(plan, full, full, rho_min, "profile")
    layers, projections = _layers(model_path, mtime, plan.task, plan.num_labels)
    if method == "lora":
        # Adapters are tiny: the run pays the forward and the activation gradients down to the lowest projection;
        # the adapters' own FLOPs are not in the base model's profile.
        names = [n for n in projections if n in profiles[0].names]
        flops = sum(p.fwd + p.step_flops(names).bwd_act for p in profiles) if names else full
        return RunCosts(plan, full, flops, rho_min, "approximate")
    if method == "topk":
        head = top_layers(profiles[0], layers, 0) if layers else ()
        rho_min = max(p.step_flops(head).total / p.full.total for p in profiles) if head else 1.0
        if hp.topk_layers is not None:  # greencore's topk trains exactly k layers when k is given
            chosen = top_layers(profiles[0], layers, min(hp.topk_layers, len(layers)))
            return RunCosts(plan, full, sum(p.step_flops(chosen).total for p in profiles), rho_min, "profile")
        return RunCosts(plan, full, None, rho_min, "budget")
    # green: epochs that select also pay the importance passes (two full steps per importance batch, as
    # greencore.importance.importance_flops counts them), inside the same budget.
    selecting = [
        sum(2 * rows * profile_of(shape).full.total for shape, rows in batches) for batches in plan.importance
    ]
    rho_min = max(
        (_cheapest(p) + (cost if epoch % hp.reselect_every == 0 else 0)) / p.full.total
        for epoch, (p, cost) in enumerate(zip(profiles, selecting, strict=True))
    )
    return RunCosts(plan, full, None, rho_min, "budget")


def run_costs(
    catalog: ModelCatalog,
    settings: Settings,
    model_id: str,
    file: File,
    method: str,
    hp: Hyperparameters,
    seed: int,
) -> RunCosts:
    """The run's FLOPs (full fine-tuning and the method) and ``rho_min``, cached; the budget fields of ``hp``
    do not enter (see :func:`resolve_rho`)."""
    path = catalog.path(model_id)
    assert settings.artifacts_dir is not None
    shape_hp = hp.model_dump_json(exclude=set(BUDGET_FIELDS))
    return _run_costs(
        str(path),
        (path / "config.json").stat().st_mtime_ns,
        str(settings.artifacts_dir / file.path),
        file.sha256,
        method,
        shape_hp,
        seed,
    )


def flops_per_kwh(settings: Settings) -> float:
    """FLOPs the device profile does per kWh."""
    return settings.device_peak_flops * settings.device_utilization * J_PER_KWH / settings.device_watts


def resolve_rho(
    method: str, hp: Hyperparameters, full_run_flops: int, rho_min: float, settings: Settings
) -> float | None:
    """The rho a job's hyperparameters put in force, or BudgetTooSmallError naming the smallest budget.

    ``rho`` as given; ``max_flops`` / ``max_energy_kwh`` (whole run) converted to the share of full fine-tuning
    they allow (1 at most); green and topk default to 0.5 (topk with ``topk_layers`` and no budget: None).
    Full and LoRA train a fixed set of tensors: a budget for them is refused.
    """
    given = any(getattr(hp, name) is not None for name in BUDGET_FIELDS)
    if method == "topk" and hp.topk_layers is not None and given:
        raise InvalidRequest(
            "topk takes topk_layers or a budget (rho, max_flops, max_energy_kwh), not both",
            param="hyperparameters",
        )
    if method in ("full", "lora"):
        if given:
            raise InvalidRequest(
                f"rho, max_flops and max_energy_kwh apply to methods green and topk, not {method}",
                param="hyperparameters",
            )
        return None
    min_flops = rho_min * full_run_flops
    min_kwh = min_flops / flops_per_kwh(settings)
    smallest = (
        f"the smallest budget that trains anything is rho_min={rho_min:.4f} of full fine-tuning, "
        f"max_flops={min_flops:.4g} or max_energy_kwh={min_kwh:.4g}"
    )
    details = {"rho_min": rho_min, "min_max_flops": min_flops, "min_max_energy_kwh": min_kwh}
    if hp.rho is not None:
        rho, asked = hp.rho, f"rho={hp.rho:g}"
    elif hp.max_flops is not None:
        implied = hp.max_flops / full_run_flops
        rho, asked = min(1.0, implied), f"max_flops={hp.max_flops:.4g} (rho {implied:.4f})"
    elif hp.max_energy_kwh is not None:
        allowed = hp.max_energy_kwh * flops_per_kwh(settings)
        implied = allowed / full_run_flops
        rho, asked = (
            min(1.0, implied),
            (
                f"max_energy_kwh={hp.max_energy_kwh:.4g} ({allowed:.4g} FLOPs on {settings.device_name}, rho {implied:.4f})"
            ),
        )
    elif method == "topk" and hp.topk_layers is not None:
        return None
    else:
        rho, asked = DEFAULT_RHO, f"the default rho={DEFAULT_RHO}"
    if rho_min > 1:
        raise BudgetTooSmallError(
            f"{method} cannot train on this dataset within any budget: choosing the tensors (importance passes) "
            f"and training one tensor cost {rho_min:.4f} of full fine-tuning (rho_min > 1); give more steps per "
            "epoch (more examples or a smaller batch_size) or fewer importance_batches",
            **details,
        )
    if rho < rho_min:
        raise BudgetTooSmallError(f"{asked} is below rho_min={rho_min:.4f}: {smallest}", **details)
    return rho


def estimate(
    catalog: ModelCatalog,
    settings: Settings,
    model_id: str,
    file: File,
    method: str,
    hp: Hyperparameters,
    seed: int,
) -> EstimatePublic:
    """The cost of a job before it runs; raises BudgetTooSmallError / InvalidRequest / DatasetInvalid."""
    costs = run_costs(catalog, settings, model_id, file, method, hp, seed)
    rho = resolve_rho(method, hp, costs.full, costs.rho_min, settings)
    method_flops = costs.method if costs.method is not None else int((rho or 1.0) * costs.full)
    flops_per_s = settings.device_peak_flops * settings.device_utilization
    joules_per_flop = settings.device_watts / flops_per_s
    grams_per_flop = joules_per_flop / J_PER_KWH * settings.carbon_intensity_g_per_kwh * settings.pue

    def pair(per_flop: float) -> FullAndMethod:
        return FullAndMethod(full=costs.full * per_flop, method=method_flops * per_flop)

    min_flops = costs.rho_min * costs.full
    plan = costs.plan
    return EstimatePublic(
        model=model_id,
        training_file=file.id,
        method=method,
        n_epochs=hp.n_epochs,
        examples=plan.examples,
        tokens=plan.tokens,
        truncated_examples=plan.truncated,
        steps_per_epoch=plan.steps_per_epoch,
        rho=rho,
        rho_min=costs.rho_min,
        flops=FlopsFullAndMethod(full=costs.full, method=method_flops),
        flops_saved=1 - method_flops / costs.full if costs.full else 0.0,
        basis=costs.basis,
        time_s=pair(1 / flops_per_s),
        energy_j=pair(joules_per_flop),
        gco2e=pair(grams_per_flop),
        minimum_budget=MinimumBudget(
            rho=costs.rho_min, max_flops=min_flops, max_energy_kwh=min_flops / flops_per_kwh(settings)
        ),
        device=DeviceProfile(
            name=settings.device_name,
            peak_flops=settings.device_peak_flops,
            utilization=settings.device_utilization,
            watts=settings.device_watts,
        ),
    )
