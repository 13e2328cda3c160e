"""Fine-tuning jobs in OpenAI's shapes: what a user asks for (``JobCreate``: ``method`` as OpenAI defines it,
``{"type": T, T: {"hyperparameters": {...}}}``) and what the service reports (``JobPublic``: OpenAI's
``fine_tuning.job`` plus GreenTrainer's budget, FLOPs, energy and progress)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic.json_schema import SkipJsonSchema

from api.schemas.common import Page, unix_s
from api.states import TERMINAL, JobState
from api.tables import Job, utcnow
from greencore import spec as core
from greencore.registry import ALIASES, DEFAULT_METHOD, METHODS, method_info, method_names
from greencore.spec import BUDGET_FIELDS, DEFAULT_RHO

AUTO_FIELDS = ("n_epochs", "batch_size", "learning_rate")  # OpenAI's "auto": the service's default
UNSUPPORTED_METHODS = ("dpo", "reinforcement")  # OpenAI's, which this service does not run
OPENAI_DEFAULT_TYPE = "supervised"  # a job that names no method


def _hyperparameters_schema() -> type[BaseModel]:
    """The API's Hyperparameters: greencore's fields (``greencore.spec.Hyperparameters``) with their defaults,
    bounds and meanings, OpenAI's ``"auto"`` for n_epochs, batch_size and learning_rate, and OpenAI's
    ``learning_rate_multiplier``; refused when unknown, infinite or NaN (JSON has no Infinity or NaN to store
    them). After validation n_epochs and batch_size are resolved ("auto": the default); ``learning_rate``
    stays "auto" until the job's estimate gives the automatic rate (``greencore.lr``), which
    ``learning_rate_multiplier`` multiplies (``resolve_learning_rate``)."""
    fields: dict[str, Any] = {}
    hints = get_type_hints(core.Hyperparameters)
    for f in dataclasses.fields(core.Hyperparameters):
        bounds = {k: f.metadata[k] for k in ("ge", "gt", "le") if f.metadata[k] is not None}
        if f.metadata["limit"] is not None:  # the service's own limit
            bounds["le"] = f.metadata["limit"]
        doc = f.metadata["doc"]
        if f.name == "learning_rate":  # greencore's own "auto": the rate greencore.lr chooses
            kind: Any = Annotated[float, Field(**bounds)] | Literal["auto"]
            fields[f.name] = (kind, Field(f.default, description=doc))
        elif f.name in AUTO_FIELDS:
            kind = Annotated[hints[f.name], Field(**bounds)] | Literal["auto"]
            fields[f.name] = (kind, Field(f.default, description=f'{doc}; "auto": {f.default}'))
        else:
            fields[f.name] = (hints[f.name], Field(f.default, description=doc, **bounds))
    fields["learning_rate_multiplier"] = (
        Annotated[float, Field(gt=0, le=1e4)] | Literal["auto"] | None,
        Field(
            None,
            description='a multiple of the automatic learning rate (learning_rate "auto"; "auto": 1); with '
            "learning_rate given too, they must agree",
        ),
    )
    return create_model(
        "Hyperparameters",
        __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
        __doc__="Training settings; defaults and bounds are greencore's (greencore.spec.Hyperparameters).",
        __validators__={
            "one_budget": model_validator(mode="after")(_one_budget),
            "resolve_auto": model_validator(mode="after")(_resolve_auto),
        },
        **fields,
    )


def _one_budget(hp: BaseModel) -> BaseModel:
    given = [name for name in BUDGET_FIELDS if getattr(hp, name) is not None]
    if len(given) > 1:
        raise ValueError(f"give one budget, not {' and '.join(given)}")
    return hp


def _resolve_auto(hp: Any) -> Any:
    defaults = core.Hyperparameters()
    for name in ("n_epochs", "batch_size"):
        if getattr(hp, name) == "auto":
            setattr(hp, name, getattr(defaults, name))
    if hp.learning_rate_multiplier == "auto":
        hp.learning_rate_multiplier = 1.0
    return hp


def resolve_learning_rate(hp: Any, auto: float) -> float:
    """The learning rate a job trains at, given the automatic rate ``auto`` of its model, batch and method:
    ``learning_rate`` where given as a number, else ``learning_rate_multiplier`` (default 1) times ``auto``.
    Both given must agree (a job's resolved hyperparameters sent again); ValueError otherwise."""
    multiplier = hp.learning_rate_multiplier
    if hp.learning_rate == "auto":
        return (1.0 if multiplier is None else multiplier) * auto
    if multiplier is not None and abs(hp.learning_rate - multiplier * auto) > 1e-6 * hp.learning_rate:
        raise ValueError(
            f"learning_rate {hp.learning_rate:g} and learning_rate_multiplier {multiplier:g} disagree: the "
            f"multiplier scales the automatic rate, {auto:.4g} for this job; give one of them"
        )
    return hp.learning_rate


Hyperparameters = _hyperparameters_schema()


def to_core(hp: BaseModel) -> core.Hyperparameters:
    """The greencore Hyperparameters of a validated API body."""
    return core.Hyperparameters(**hp.model_dump(exclude={"learning_rate_multiplier"}))


def _known_type(name: str) -> str:
    if name in UNSUPPORTED_METHODS:
        raise ValueError(
            f"method.type {name!r} is not supported: this service fine-tunes with {', '.join(method_names())}"
        )
    method_info(name)  # MethodError (a ValueError: 400 naming the known methods) for an unknown name
    return name


def _types_schema(schema: dict[str, Any]) -> None:
    # Read when the schema is generated (not at import): a method registered later is listed too.
    schema["enum"] = method_names()
    schema["x-default-method"] = DEFAULT_METHOD
    schema["x-default-rho"] = DEFAULT_RHO  # the budget of a job that names none
    schema["x-aliases"] = dict(ALIASES)
    schema["x-methods"] = [
        {"name": m.name, "title": m.title, "summary": m.summary, "budgeted": m.budgeted}
        for m in METHODS.values()
    ]


MethodType = Annotated[
    str,
    AfterValidator(_known_type),
    Field(
        description=(
            f"{OPENAI_DEFAULT_TYPE} (GreenTrainer at its default budget) or a method of greencore.registry "
            "(x-methods lists them)"
        ),
        json_schema_extra=_types_schema,
    ),
]


class MethodSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class JobMethod(BaseModel):
    """OpenAI's method object: ``{"type": T, T: {"hyperparameters": {...}}}``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"additionalProperties": {"$ref": "#/components/schemas/MethodSettings"}},
    )

    type: MethodType
    settings: SkipJsonSchema[MethodSettings] = Field(default_factory=MethodSettings, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _settings_under_type(cls, data: Any) -> Any:
        # The settings sit under the key the type names; other keys are refused (extra="forbid").
        if isinstance(data, dict) and isinstance(data.get("type"), str) and "settings" not in data:
            data = dict(data)
            if data["type"] in data:
                data["settings"] = data.pop(data["type"])
        return data


class RunCreate(BaseModel):
    """What a run is: the base model, the data, the method and its hyperparameters, the seed."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a model id from GET /v1/models: a base model or a fine-tuned one")
    training_file: str = Field(description="a file id from POST /v1/files")
    method: JobMethod = Field(
        default_factory=lambda: JobMethod(type=OPENAI_DEFAULT_TYPE),
        description='OpenAI\'s method object; default {"type": "supervised"}',
    )
    hyperparameters: Hyperparameters | None = Field(
        None, description="deprecated by OpenAI: hyperparameters of a supervised job (use method instead)"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds initialisation, data order and dropout")

    @model_validator(mode="after")
    def _hyperparameters_once(self) -> RunCreate:
        if self.hyperparameters is not None:
            if "hyperparameters" in self.method.settings.model_fields_set:
                raise ValueError(
                    "give hyperparameters once: in method (top-level hyperparameters are deprecated)"
                )
            self.method.settings.hyperparameters = self.hyperparameters
            self.hyperparameters = None
        return self

    @property
    def method_type(self) -> str:
        return self.method.type

    @property
    def hp(self) -> Any:
        """The resolved hyperparameters (an instance of :data:`Hyperparameters`)."""
        return self.method.settings.hyperparameters


class JobCreate(RunCreate):
    validation_file: str | None = Field(None, description="a file id, for validation loss and accuracy")
    suffix: str | None = Field(
        None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="goes into fine_tuned_model"
    )
    metadata: dict[str, str] | None = Field(
        None, description="up to 16 pairs; keys of 64, values of 512 chars"
    )
    integrations: list[dict[str, Any]] | None = Field(None, description="not supported: must be empty")

    @model_validator(mode="after")
    def _openai_limits(self) -> JobCreate:
        if self.integrations:
            raise ValueError("integrations are not supported by this service")
        if self.metadata is not None:
            if len(self.metadata) > 16:
                raise ValueError("metadata holds at most 16 pairs")
            if any(len(k) > 64 or len(v) > 512 for k, v in self.metadata.items()):
                raise ValueError("metadata keys hold at most 64 characters, values 512")
        return self


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


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


def fine_tuned_model_id(job: Job) -> str:
    """``ft:{base}:{suffix}:{job id}``, the name of the model a job makes; the base of a job that fine-tuned a
    fine-tuned model is that model's base."""
    base = job.model.split(":")[1] if job.model.startswith("ft:") else job.model
    return f"ft:{base}:{job.suffix or ''}:{job.id}"


class JobPublic(BaseModel):
    """OpenAI's ``fine_tuning.job``, then GreenTrainer's additions (rho ... attempts)."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None = Field(description="the model the job made, once it succeeded")
    finished_at: int | None
    hyperparameters: dict[str, Any] = Field(description="every hyperparameter in force, resolved")
    model: str
    organization_id: str = Field(description="the tenant")
    result_files: list[str] = Field(description="always empty: per-epoch records are at .../epochs")
    seed: int
    status: JobState
    trained_tokens: int | None = Field(description="tokens trained in the epochs done")
    training_file: str
    validation_file: str | None
    estimated_finish: int | None = Field(description="seconds since 1970 when it should end (running jobs)")
    integrations: list[dict[str, Any]]
    metadata: dict[str, str] | None
    method: dict[str, Any] = Field(description='{"type": T, T: {"hyperparameters": {...}}}')
    suffix: str | None
    rho: float | None = Field(description="the budget in force: share of full fine-tuning FLOPs")
    rho_min: float | None = Field(description="smallest rho that trains anything on this model and dataset")
    started_at: int | None
    progress: JobProgress
    flops: JobFlops
    energy_j: float
    gco2e: float
    epochs_done: int
    estimate: dict[str, Any] | None = Field(description="the estimate made at creation (POST /v1/estimates)")
    attempts: int = Field(description="times a worker started or resumed it")
    world_size: int | None = Field(
        description="ranks (processes, one per GPU) its latest attempt runs on; null before a worker takes it"
    )
    communication_bytes: int = Field(description="bytes its ranks exchanged in the epochs done")
    communication_bytes_full: int = Field(
        description="what full fine-tuning would have exchanged on the same ranks and steps"
    )

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        n_epochs = int(job.hyperparameters.get("n_epochs", 1))
        progress = _progress(job, n_epochs)
        finish = None
        if job.status == JobState.running and progress.eta_s is not None:
            finish = int(utcnow().timestamp() + progress.eta_s)
        return cls(
            id=job.id,
            created_at=unix_s(job.created_at) or 0,
            error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
            fine_tuned_model=fine_tuned_model_id(job) if job.status == JobState.succeeded else None,
            finished_at=unix_s(job.finished_at),
            hyperparameters=job.hyperparameters,
            model=job.model,
            organization_id=job.tenant_id,
            result_files=[],
            seed=job.seed,
            status=JobState(job.status),
            trained_tokens=job.trained_tokens or 0,
            training_file=job.training_file,
            validation_file=job.validation_file,
            estimated_finish=finish,
            integrations=[],
            metadata=job.user_metadata,
            method={"type": job.method, job.method: {"hyperparameters": job.hyperparameters}},
            suffix=job.suffix,
            rho=job.rho,
            rho_min=job.rho_min,
            started_at=unix_s(job.started_at),
            progress=progress,
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
            world_size=job.world_size,
            communication_bytes=job.communication_bytes or 0,
            communication_bytes_full=job.communication_bytes_full or 0,
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
