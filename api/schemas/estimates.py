"""What a job would cost before it runs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from api.schemas.jobs import RunCreate


class EstimateCreate(RunCreate):
    """A job's run (the body of POST /v1/fine_tuning/jobs, without what does not change its cost)."""


class FullAndMethod(BaseModel):
    full: float = Field(description="full fine-tuning")
    method: float = Field(description="the chosen method at the budget in force")


class FlopsFullAndMethod(BaseModel):
    full: int = Field(description="full fine-tuning")
    method: int = Field(description="the chosen method at the budget in force")


class MinimumBudget(BaseModel):
    rho: float = Field(description="rho_min")
    max_flops: float = Field(description="the smallest whole-run FLOPs budget that trains anything")
    max_energy_kwh: float = Field(description="the same budget as energy on the device profile, kWh")


class DeviceProfile(BaseModel):
    name: str
    peak_flops: float = Field(description="FLOP/s")
    utilization: float
    watts: float


class EstimatePublic(BaseModel):
    object: Literal["estimate"] = "estimate"
    model: str
    training_file: str
    method: str = Field(description="method.type of the request")
    n_epochs: int
    examples: int = Field(description="examples trained per epoch")
    tokens: int = Field(description="tokens per epoch (after cutting at max_seq_len)")
    truncated_examples: int
    steps_per_epoch: int
    rho: float | None = Field(description="the budget in force, from rho, max_flops or max_energy_kwh")
    rho_min: float
    flops: FlopsFullAndMethod = Field(description="FLOPs of the whole run")
    flops_saved: float = Field(description="1 - flops.method / flops.full")
    basis: Literal["budget", "profile", "approximate"] = Field(
        description="budget: the method spends at most rho * full (green, topk by rho); profile: the exact "
        "FLOPs of its fixed tensor set; approximate: LoRA adapters are not in the base profile"
    )
    time_s: FullAndMethod = Field(description="seconds on the device profile")
    energy_j: FullAndMethod = Field(description="joules on the device profile")
    gco2e: FullAndMethod = Field(description="grams CO2e at the configured grid intensity and PUE")
    minimum_budget: MinimumBudget
    device: DeviceProfile
