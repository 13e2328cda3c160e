"""What a job leaves behind: epochs, events and checkpoints."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from api.schemas.common import Page, unix_s
from api.tables import Checkpoint, Epoch, Event


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
            train_loss=row.train_loss,
            valid_loss=row.valid_loss,
            valid_accuracy=row.valid_accuracy,
            valid_token_accuracy=row.valid_token_accuracy,
            energy_j=row.energy_j,
            energy_method=row.energy_method,
            energy_inputs=row.energy_inputs,
            gco2e=row.gco2e,
            created_at=unix_s(row.created_at) or 0,
        )


class EpochsPublic(Page):
    data: list[EpochPublic]


class EventPublic(BaseModel):
    id: int
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    type: str = Field(description="status, selection, epoch, checkpoint, error or info")
    level: str
    message: str
    data: dict[str, Any] | None
    created_at: int

    @classmethod
    def of(cls, row: Event) -> EventPublic:
        return cls(
            id=row.id,
            type=row.type,
            level=row.level,
            message=row.message,
            data=row.data,
            created_at=unix_s(row.created_at) or 0,
        )


class EventsPublic(Page):
    data: list[EventPublic]


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    job_id: str
    name: str = Field(description="epoch-N or final")
    epoch: int | None
    bytes: int = Field(description="size of the folder's files")
    created_at: int

    @classmethod
    def of(cls, row: Checkpoint) -> CheckpointPublic:
        return cls(
            id=row.id,
            job_id=row.job_id,
            name=row.name,
            epoch=row.epoch,
            bytes=row.bytes,
            created_at=unix_s(row.created_at) or 0,
        )


class CheckpointsPublic(Page):
    data: list[CheckpointPublic]
