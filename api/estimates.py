"""What a job costs before it runs, and the budget (rho) its hyperparameters put in force: the service's side
of ``greencore.estimate``.

The dataset is tokenized with the model's tokenizer exactly as the training run will (``greencore.data``) and
checked for lines that would train nothing; greencore plans and profiles the run (``run_costs``) and prices a
budget against it (``RunCosts.estimate``). Tokenized datasets and run costs are cached by (model folder and
its mtime, file and its SHA-256, the hyperparameters that shape the run, seed): creating a job after
estimating it costs no second profile, and a new budget for the same run costs no new plan.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from api.catalog import tokenizer_at
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
from api.schemas.jobs import Hyperparameters, to_core
from api.tables import File
from greencore.spec import BUDGET_FIELDS


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


@lru_cache(maxsize=256)
def _run_costs(
    model_path: str, mtime: int, file_path: str, sha256: str, method: str, hp_json: str, seed: int
) -> Any:
    from greencore.estimate import run_costs

    hp = to_core(Hyperparameters.model_validate_json(hp_json))
    encoded, num_labels = _encoded(model_path, mtime, file_path, sha256, hp.max_seq_len)
    return run_costs(model_path, encoded, method, hp, seed, num_labels)


def estimate(
    settings: Settings,
    model_path: Path,
    model_id: str,
    file: File,
    method: str,
    hp: BaseModel,
    seed: int,
) -> EstimatePublic:
    """The cost of a job before it runs (``model_path``: the folder of ``model_id``, base or fine-tuned;
    ``hp``: validated ``api.schemas.jobs.Hyperparameters``); raises BudgetTooSmallError / InvalidRequest /
    DatasetInvalid."""
    from greencore.estimate import flops_per_kwh
    from greencore.select import BudgetTooSmall
    from greencore.spec import SpecError

    # A budget does not change the plan; the multiplier is in learning_rate already.
    shape_hp = hp.model_dump_json(exclude={*BUDGET_FIELDS, "learning_rate_multiplier"})
    costs = _run_costs(
        str(model_path),
        (model_path / "config.json").stat().st_mtime_ns,
        str(settings.artifacts_dir / file.path),
        file.sha256,
        method,
        shape_hp,
        seed,
    )
    try:
        est = costs.estimate(to_core(hp), settings.energy)
    except SpecError as exc:
        raise InvalidRequest(exc.message, param=exc.field) from exc
    except BudgetTooSmall as exc:
        min_flops = exc.rho_min * costs.full
        raise BudgetTooSmallError(
            str(exc),
            rho_min=exc.rho_min,
            min_max_flops=min_flops,
            min_max_energy_kwh=min_flops / flops_per_kwh(settings.energy),
        ) from exc
    energy = settings.energy
    return EstimatePublic(
        model=model_id,
        training_file=file.id,
        method=method,
        n_epochs=est.n_epochs,
        examples=est.examples,
        tokens=est.tokens,
        truncated_examples=est.truncated_examples,
        steps_per_epoch=est.steps_per_epoch,
        rho=est.rho,
        rho_min=est.rho_min,
        flops=FlopsFullAndMethod(full=est.flops_full, method=est.flops_method),
        flops_saved=est.flops_saved,
        basis=est.basis,
        time_s=FullAndMethod(full=est.time_s.full, method=est.time_s.method),
        energy_j=FullAndMethod(full=est.energy_j.full, method=est.energy_j.method),
        gco2e=FullAndMethod(full=est.gco2e.full, method=est.gco2e.method),
        minimum_budget=MinimumBudget(
            rho=est.rho_min, max_flops=est.min_max_flops, max_energy_kwh=est.min_max_energy_kwh
        ),
        device=DeviceProfile(
            name=energy.device_name,
            peak_flops=energy.peak_flops,
            utilization=energy.utilization,
            watts=energy.watts,
        ),
    )
