"""Fine-tuning jobs: what a user asks for and what the service reports."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.schemas.common import Page, unix_s
from api.states import TERMINAL, JobState
from api.tables import Job, utcnow

Method = Literal["green", "full", "lora", "topk"]  # greencore.spec.METHODS
BUDGET_FIELDS = ("rho", "max_flops", "max_energy_kwh")


class Hyperparameters(BaseModel):
    """Training settings; defaults are greencore's (greencore.spec.Hyperparameters)."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False
    )  # JSON has no Infinity or NaN to store them

    n_epochs: int = Field(3, ge=1, le=1000, description="passes over the training file")
    batch_size: int = Field(8, ge=1, le=4096, description="sequences per optimizer step")
    learning_rate: float = Field(5e-5, gt=0, le=1, description="AdamW peak learning rate")
    max_seq_len: int = Field(512, ge=8, le=131072, description="tokens per example; longer ones are cut")
    rho: float | None = Field(
        None,
        gt=0,
        le=1,
        description="share of full fine-tuning FLOPs allowed (green, topk); green default 0.5",
    )
    max_flops: float | None = Field(None, gt=0, description="instead of rho: FLOPs allowed for the whole run")
    max_energy_kwh: float | None = Field(
        None, gt=0, description="instead of rho: energy allowed for the whole run, kWh on the device profile"
    )
    reselect_every: int = Field(1, ge=1, le=1000, description="epochs between tensor selections (green)")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps, then linear decay to 0")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay")
    lora_r: int = Field(8, ge=1, le=1024, description="LoRA rank (lora)")
    lora_alpha: int = Field(16, ge=1, le=65536, description="LoRA scaling numerator (lora)")
    topk_layers: int | None = Field(
        None, ge=0, description="layers trained from the top (topk); 0: the head only"
    )
    importance_batches: int = Field(1, ge=1, le=64, description="batches importance is measured on (green)")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="gradient clipping to this L2 norm; null: none"
    )
    bf16: bool = Field(False, description="bf16 autocast on CUDA (weights stay float32); ignored on CPU")

    @model_validator(mode="after")
    def _one_budget(self) -> Hyperparameters:
        given = [name for name in BUDGET_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget, not {' and '.join(given)}")
        return self


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a base model id from GET /v1/models")
    training_file: str = Field(description="a file id from POST /v1/files")
    validation_file: str | None = Field(None, description="a file id, for validation loss and accuracy")
    method: Method = "green"
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
