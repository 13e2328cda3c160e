"""Fine-tuning jobs: what a user asks for and what the service reports."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator

from api.schemas.common import Page, unix_s
from api.states import TERMINAL, JobState
from api.tables import Job, utcnow
from greencore import spec as core
from greencore.registry import DEFAULT_METHOD, METHODS, method_info
from greencore.spec import BUDGET_FIELDS


def _hyperparameters_schema() -> type[BaseModel]:
    """The API's Hyperparameters: greencore's fields (``greencore.spec.Hyperparameters``) with their defaults,
    bounds and meanings, refused when unknown, infinite or NaN (JSON has no Infinity or NaN to store them)."""
    fields: dict[str, Any] = {}
    hints = get_type_hints(core.Hyperparameters)
    for f in dataclasses.fields(core.Hyperparameters):
        bounds = {k: f.metadata[k] for k in ("ge", "gt", "le") if f.metadata[k] is not None}
        if f.metadata["limit"] is not None:  # the service's own limit
            bounds["le"] = f.metadata["limit"]
        fields[f.name] = (hints[f.name], Field(f.default, description=f.metadata["doc"], **bounds))
    return create_model(
        "Hyperparameters",
        __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
        __doc__="Training settings; defaults and bounds are greencore's (greencore.spec.Hyperparameters).",
        __validators__={"one_budget": model_validator(mode="after")(_one_budget)},
        **fields,
    )


def _one_budget(hp: BaseModel) -> BaseModel:
    given = [name for name in BUDGET_FIELDS if getattr(hp, name) is not None]
    if len(given) > 1:
        raise ValueError(f"give one budget, not {' and '.join(given)}")
    return hp


Hyperparameters = _hyperparameters_schema()


def to_core(hp: BaseModel) -> core.Hyperparameters:
    """The greencore Hyperparameters of a validated API body."""
    return core.Hyperparameters(**hp.model_dump())


def _known_method(name: str) -> str:
    method_info(name)  # MethodError (a ValueError: 422 naming the known methods) for an unknown name
    return name


def _methods_schema(schema: dict[str, Any]) -> None:
    # Read when the schema is generated (not at import): a method registered later is listed too.
    schema["enum"] = list(METHODS)
    schema["x-methods"] = [
        {"name": m.name, "title": m.title, "summary": m.summary, "budgeted": m.budgeted}
        for m in METHODS.values()
    ]


Method = Annotated[
    str,
    AfterValidator(_known_method),
    Field(
        description="a method of greencore.registry (x-methods lists them)", json_schema_extra=_methods_schema
    ),
]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a base model id from GET /v1/models")
    training_file: str = Field(description="a file id from POST /v1/files")
    validation_file: str | None = Field(None, description="a file id, for validation loss and accuracy")
    method: Method = DEFAULT_METHOD
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")


class JobError(BaseModel):
    code: str
    message: str


class JobProgress(BaseModel):
    epoch: int | None = Field(description="the epoch running (1-based)")
    n_epochs: int
    step: int | None = Field(description="optimizer steps done in this epoch")
    steps_in_epoch: int | None
    fraction: float = Field(description="share of the run done, 0 to 1")
    eta_s: float | None = Field(description="seconds left, from the pace so far")


class JobFlops(BaseModel):
    total: int = Field(description="FLOPs spent in the epochs done, importance passes included")
    full: int = Field(description="what full fine-tuning would have spent on the same tokens")
    saved: float | None = Field(description="1 - total/full")


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    training_file: str
    validation_file: str | None
    method: Method
    hyperparameters: dict[str, Any]
    seed: int
    suffix: str | None
    status: JobState
    rho: float | None = Field(description="the budget in force: share of full fine-tuning FLOPs")
    rho_min: float | None = Field(description="smallest rho that trains anything on this model and dataset")
    created_at: int
    started_at: int | None
    finished_at: int | None
    error: JobError | None
    progress: JobProgress
    flops: JobFlops
    energy_j: float
    gco2e: float
    epochs_done: int
    estimate: dict[str, Any] | None = Field(description="the estimate made at creation (POST /v1/estimates)")
    attempts: int = Field(description="times a worker started or resumed it")

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        n_epochs = int(job.hyperparameters.get("n_epochs", 1))
        return cls(
            id=job.id,
            model=job.model,
            training_file=job.training_file,
            validation_file=job.validation_file,
            method=job.method,
            hyperparameters=job.hyperparameters,
            seed=job.seed,
            suffix=job.suffix,
            status=JobState(job.status),
            rho=job.rho,
            rho_min=job.rho_min,
            created_at=unix_s(job.created_at) or 0,
            started_at=unix_s(job.started_at),
            finished_at=unix_s(job.finished_at),
            error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
            progress=_progress(job, n_epochs),
            flops=JobFlops(
                total=job.flops_total or 0,
                full=job.flops_full or 0,
                saved=1 - job.flops_total / job.flops_full if job.flops_full else None,
            ),
            energy_j=job.energy_j or 0.0,
            gco2e=job.gco2e or 0.0,
            epochs_done=job.epochs_done or 0,
            estimate=job.estimate,
            attempts=job.attempts,
        )


def _progress(job: Job, n_epochs: int) -> JobProgress:
    if job.status == JobState.succeeded:
        fraction = 1.0
    else:
        within = job.current_step / job.steps_in_epoch if job.current_step and job.steps_in_epoch else 0.0
        done = job.epochs_done or 0
        running = job.current_epoch is not None and job.current_epoch > done
        fraction = min(1.0, (done + (within if running else 0.0)) / n_epochs)
    eta = None
    if job.status == JobState.running and job.started_at is not None and fraction > 0:
        started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=utcnow().tzinfo)
        elapsed = (utcnow() - started).total_seconds()
        eta = max(0.0, elapsed * (1 - fraction) / fraction)
    elif job.status in TERMINAL:
        eta = 0.0
    return JobProgress(
        epoch=job.current_epoch,
        n_epochs=n_epochs,
        step=job.current_step,
        steps_in_epoch=job.steps_in_epoch,
        fraction=fraction,
        eta_s=eta,
    )


class JobsPublic(Page):
    data: list[JobPublic]
