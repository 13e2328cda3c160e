"""What a job leaves behind: epochs, events and checkpoints."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from api.errors import InvalidRequest
from api.schemas.common import MAX_ROW_ID, Page, unix_s
from api.schemas.jobs import fine_tuned_model_id
from api.tables import Checkpoint, Epoch, Event, Job


class EpochFlops(BaseModel):
    fwd: int = Field(description="forward passes of the training steps")
    bwd_act: int = Field(description="activation gradients")
    bwd_weight: int = Field(description="weight gradients")
    selection: int = Field(description="importance passes that chose the tensors")
    total: int = Field(description="everything this epoch spent: fwd + bwd_act + bwd_weight + selection")
    full: int = Field(description="what full fine-tuning would spend on the same tokens")
    predicted_step: int = Field(description="the profile's prediction for the measured step")
    measured_step: int = Field(description="one real step counted by FlopCounterMode")


class EpochPublic(BaseModel):
    object: Literal["fine_tuning.job.epoch"] = "fine_tuning.job.epoch"
    epoch: int
    selected_tensors: list[str]
    flops: EpochFlops
    rho_achieved: float = Field(description="flops.total / flops.full")
    tokens: int
    steps: int
    truncated_examples: int
    dropped_examples: int = Field(description="examples with no loss token left after truncation")
    selection: dict[str, Any] | None = Field(description="how the tensors were chosen (method details)")
    wall_s: float
    valid_wall_s: float = Field(0.0, description="the part of wall_s spent on validation")
    train_loss: float | None
    valid_loss: float | None
    valid_accuracy: float | None
    valid_token_accuracy: float | None
    energy_j: float
    energy_method: str = Field(description="nvml, rapl or estimate")
    energy_inputs: dict[str, Any] | None = Field(
        description="what the estimate used (energy_method estimate)"
    )
    gco2e: float
    device: str | None = Field(None, description="the device profile it ran on (null: not recorded)")
    world_size: int = Field(1, description="the ranks (processes) the epoch ran on")
    communication_bytes: int = Field(0, description="bytes the ranks exchanged (gradients all-reduced)")
    communication_bytes_full: int = Field(
        0, description="what full fine-tuning would all-reduce over the same steps"
    )
    learning_rate: float | None = Field(
        None, description="the peak learning rate it trained at (null: recorded before it was kept)"
    )
    created_at: int

    @classmethod
    def of(cls, row: Epoch) -> EpochPublic:
        keys = EpochFlops.model_fields
        flops = EpochFlops(**{k: int(row.flops.get(k, 0) or 0) for k in keys})
        return cls(
            epoch=row.epoch,
            selected_tensors=row.selected_tensors,
            flops=flops,
            rho_achieved=row.rho_achieved,
            tokens=row.tokens,
            steps=row.steps,
            truncated_examples=row.truncated_examples,
            dropped_examples=row.dropped_examples,
            selection=row.selection,
            wall_s=row.wall_s,
            valid_wall_s=row.valid_wall_s,
            train_loss=row.train_loss,
            valid_loss=row.valid_loss,
            valid_accuracy=row.valid_accuracy,
            valid_token_accuracy=row.valid_token_accuracy,
            energy_j=row.energy_j,
            energy_method=row.energy_method,
            energy_inputs=row.energy_inputs,
            gco2e=row.gco2e,
            device=row.device,
            world_size=row.world_size,
            communication_bytes=row.communication_bytes,
            communication_bytes_full=row.communication_bytes_full,
            learning_rate=row.learning_rate,
            created_at=unix_s(row.created_at) or 0,
        )


class EpochsPublic(Page):
    data: list[EpochPublic]


EVENT_PREFIX = "ftevent-"
EVENT_ID_PATTERN = r"^(ftevent-)?[0-9]{1,10}$"


def event_number(event_id: str) -> int:
    """The row number of an event id (``ftevent-N``, or ``N``); InvalidRequest past the 32-bit column."""
    number = int(event_id.removeprefix(EVENT_PREFIX))
    if number > MAX_ROW_ID:
        raise InvalidRequest(f"after: no event has the id {event_id!r}", param="after")
    return number


class EventPublic(BaseModel):
    """OpenAI's ``fine_tuning.job.event``; ``kind`` says what happened in GreenTrainer's terms."""

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = Field(description="metrics: an epoch's numbers in data")
    data: dict[str, Any] | None
    kind: str = Field(description="status, selection, epoch, checkpoint, error or info")

    @classmethod
    def of(cls, row: Event) -> EventPublic:
        return cls(
            id=f"{EVENT_PREFIX}{row.id}",
            created_at=unix_s(row.created_at) or 0,
            level=row.level if row.level in ("info", "warn", "error") else "info",
            message=row.message,
            type="metrics" if row.type == "epoch" else "message",
            data=row.data,
            kind=row.type,
        )


class EventsPublic(Page):
    data: list[EventPublic]


class CheckpointPublic(BaseModel):
    """OpenAI's ``fine_tuning.job.checkpoint``, with the checkpoint's name, epoch and size."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="a model id: usable as a job's model")
    fine_tuning_job_id: str
    metrics: dict[str, float | None] = Field(description="the epoch's step, losses and accuracies")
    step_number: int = Field(description="optimizer steps done when it was written")
    name: str = Field(description="epoch-N or final")
    epoch: int | None
    bytes: int

    @classmethod
    def of(cls, row: Checkpoint, job: Job, step: int, epoch: Epoch | None) -> CheckpointPublic:
        metrics: dict[str, float | None] = {"step": float(step)}
        if epoch is not None:
            metrics.update(
                train_loss=epoch.train_loss,
                valid_loss=epoch.valid_loss,
                valid_mean_token_accuracy=epoch.valid_token_accuracy,
                valid_accuracy=epoch.valid_accuracy,
            )
        return cls(
            id=row.id,
            created_at=unix_s(row.created_at) or 0,
            fine_tuned_model_checkpoint=f"{fine_tuned_model_id(job)}:ckpt-step-{step}",
            fine_tuning_job_id=job.id,
            metrics=metrics,
            step_number=step,
            name=row.name,
            epoch=row.epoch,
            bytes=row.bytes,
        )


class CheckpointsPublic(Page):
    data: list[CheckpointPublic]
