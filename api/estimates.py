"""What a job costs before it runs, and the budget (rho) its hyperparameters put in force: the service's side
of ``greencore.estimate``.

The dataset is tokenized with the model's tokenizer exactly as the training run will (``greencore.data``) and
checked for lines that would train nothing; greencore plans and profiles the run (``run_costs``) and prices a
budget against it (``RunCosts.estimate``), timed on the measured throughput of the device profile's latest
epochs where there are any (``api.throughput``, read by the caller while it holds a session). Tokenized
datasets and run costs are cached by (model folder and its mtime, file and its SHA-256, the hyperparameters
that shape the run, seed): creating a job after estimating it costs no second profile, and a new budget for
the same run costs no new plan. The tokenized
datasets kept hold at most GT_ESTIMATE_CACHE_TOKENS token ids in all (:class:`EncodedCache`); callers run
an estimate on a dataset thread (``api.datasets.on_dataset_thread`` or ``dataset_slot``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from api.catalog import tokenizer_at
from api.config import Settings
from api.datasets import dataset_limits, inspect_dataset
from api.errors import BudgetTooSmallError, DatasetInvalid, InvalidRequest
from api.schemas.estimates import (
    BasisPublic,
    DeviceProfile,
    EstimatePublic,
    FlopsFullAndMethod,
    FullAndMethod,
    LearningRatePublic,
    MemoryPublic,
    MinimumBudget,
    PeakMemoryPublic,
)
from api.schemas.jobs import Hyperparameters, resolve_learning_rate, to_core
from api.tables import File
from greencore.spec import BUDGET_FIELDS

if TYPE_CHECKING:
    from greencore.data import DatasetLimits, Encoded
    from greencore.throughput import Calibration, CalibrationBasis


class EncodedCache:
    """Tokenized datasets by key, the least recently used dropped first, holding at most ``max_ids`` token ids
    (input ids and labels) in all: a count of entries would not bound memory, one dataset may hold a
    million times another's ids. A dataset of more ids than ``max_ids`` is not kept. Thread-safe; two threads
    missing the same key both tokenize it, as with ``lru_cache``."""

    def __init__(self) -> None:
        self._entries: OrderedDict[Hashable, tuple[tuple[Encoded, int | None], int]] = OrderedDict()
        self.held_ids = 0
        self._lock = threading.Lock()

    def get(
        self, key: Hashable, max_ids: int, make: Callable[[], tuple[Encoded, int | None]]
    ) -> tuple[Encoded, int | None]:
        """The entry of ``key``, made by ``make`` (and kept, within ``max_ids``) when there is none."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
        value = make()
        ids = held_ids(value[0])
        with self._lock:
            if ids <= max_ids and key not in self._entries:
                self._entries[key] = (value, ids)
                self.held_ids += ids
            while self.held_ids > max_ids:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.held_ids -= dropped
        return value


def held_ids(encoded: Encoded) -> int:
    """Token ids a tokenized dataset holds: its input ids and its labels (one per token, or per example)."""
    ids = sum(len(row) for row in encoded.input_ids)
    return ids + sum(len(row) if isinstance(row, list) else 1 for row in encoded.labels)


ENCODED = EncodedCache()


def _encoded(
    model_path: str,
    mtime: int,
    file_path: str,
    sha256: str,
    max_seq_len: int,
    limits: DatasetLimits,
    cache_ids: int,
) -> tuple[Encoded, int | None]:
    key = (model_path, mtime, file_path, sha256, max_seq_len, limits)
    return ENCODED.get(key, cache_ids, lambda: _encode(model_path, mtime, file_path, max_seq_len, limits))


def _encode(
    model_path: str, mtime: int, file_path: str, max_seq_len: int, limits: DatasetLimits
) -> tuple[Encoded, int | None]:
    from greencore.data import PROMPT_COMPLETION, DatasetError, encode_dataset, task_for
    from greencore.models import load_config

    tokenizer = tokenizer_at(model_path, mtime)
    # Counted with the model's tokenizer, the dataset is held to GT_MAX_DATASET_TOKENS whatever counted it at
    # its upload (if anything did).
    summary = inspect_dataset(Path(file_path), limits, tokenizer)
    config = load_config(model_path)
    task = task_for(summary.format, config)
    if task == "classification" and getattr(config, "is_encoder_decoder", False):
        raise InvalidRequest(
            "text/label data trains a classifier: pick a model that is not encoder-decoder", param="model"
        )
    label2id = {name: i for i, name in enumerate(summary.labels)} if summary.labels else None
    try:
        encoded = encode_dataset(summary, tokenizer, task, max_seq_len, label2id)
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
    model_path: str,
    mtime: int,
    file_path: str,
    sha256: str,
    method: str,
    hp_json: str,
    seed: int,
    limits: DatasetLimits,
    cache_ids: int,
    device: str | None,
    world_size: int,
) -> Any:
    from greencore.estimate import run_costs

    hp = to_core(Hyperparameters.model_validate_json(hp_json))
    encoded, num_labels = _encoded(model_path, mtime, file_path, sha256, hp.max_seq_len, limits, cache_ids)
    return run_costs(model_path, encoded, method, hp, seed, num_labels, device, world_size)


def estimate(
    settings: Settings,
    model_path: Path,
    model_id: str,
    file: File,
    method: str,
    hp: BaseModel,
    seed: int,
    calibration: Calibration | None = None,
) -> EstimatePublic:
    """The cost of a job before it runs (``model_path``: the folder of ``model_id``, base or fine-tuned;
    ``hp``: validated ``api.schemas.jobs.Hyperparameters``; ``calibration``: time and energy from measured
    epochs, ``api.throughput.calibration_for``; None: the declared device profile); raises
    BudgetTooSmallError / InvalidRequest / DatasetInvalid. Reads and tokenizes the dataset unless cached: call
    it on a dataset thread."""
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
        dataset_limits(settings),
        settings.estimate_cache_tokens,
        settings.train_device,  # the memory is replayed for the workers' device type
        settings.worker_nproc,  # and for one of the ranks each job runs on
    )
    try:
        est = costs.estimate(to_core(hp), settings.energy, calibration)
    except SpecError as exc:
        raise InvalidRequest(exc.message, param=exc.field) from exc
    except BudgetTooSmall as exc:
        min_flops = exc.rho_min * costs.full
        raise BudgetTooSmallError(
            str(exc),
            rho_min=exc.rho_min,
            advice=exc.advice,
            min_max_flops=min_flops,
            min_max_energy_kwh=min_flops / flops_per_kwh(settings.energy),
        ) from exc
    auto = est.learning_rate
    try:
        learning_rate = resolve_learning_rate(hp, auto.learning_rate)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="learning_rate_multiplier") from exc
    energy = settings.energy
    memory = est.memory
    assert memory is not None  # run_costs always gives the memory model

    def basis(of: CalibrationBasis) -> BasisPublic:
        return BasisPublic(
            basis=of.basis,
            match=of.match,
            epochs=of.epochs,
            device=of.device,
            model=of.model,
            method=of.method,
        )

    def peaks(of: Any) -> PeakMemoryPublic:
        return PeakMemoryPublic(
            train_step_bytes=of.train_step_bytes,
            importance_bytes=of.importance_bytes,
            peak_bytes=of.peak_bytes,
        )

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
        reselect_every=est.settings.get("reselect_every"),
        flops=FlopsFullAndMethod(full=est.flops_full, method=est.flops_method),
        flops_saved=est.flops_saved,
        basis=est.basis,
        time_s=FullAndMethod(full=est.time_s.full, method=est.time_s.method),
        time_basis=basis(est.time_basis),
        energy_basis=basis(est.energy_basis),
        learning_rate=LearningRatePublic(
            learning_rate=learning_rate,
            auto=auto.learning_rate,
            multiplier=learning_rate / auto.learning_rate,
            full=auto.full,
            scale=auto.scale,
            non_embedding_params=costs.lr_basis.non_embedding_params,
        ),
        energy_j=FullAndMethod(full=est.energy_j.full, method=est.energy_j.method),
        gco2e=FullAndMethod(full=est.gco2e.full, method=est.gco2e.method),
        peak_memory_bytes=FlopsFullAndMethod(full=memory.full.peak_bytes, method=memory.method.peak_bytes),
        memory=MemoryPublic(
            full=peaks(memory.full),
            method=peaks(memory.method),
            basis=memory.basis,
            device_type=memory.device,
            world_size=memory.world_size,
        ),
        minimum_budget=MinimumBudget(
            rho=est.rho_min, max_flops=est.min_max_flops, max_energy_kwh=est.min_max_energy_kwh
        ),
        device=DeviceProfile(
            name=energy.device_name,
            peak_flops=energy.peak_flops,
            utilization=energy.utilization,
            watts=energy.watts,
            memory_bytes=settings.device_memory_bytes,
        ),
    )
