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
    memory_bytes: int | None = Field(
        None, description="the device's memory (GT_DEVICE_MEMORY_BYTES); null: not declared, nothing refused"
    )


class PeakMemoryPublic(BaseModel):
    train_step_bytes: int = Field(description="peak of one training step")
    importance_bytes: int = Field(description="peak of one importance evaluation (0: the method has none)")
    peak_bytes: int = Field(description="the larger of the two")


class MemoryPublic(BaseModel):
    full: PeakMemoryPublic = Field(description="full fine-tuning on the same batches")
    method: PeakMemoryPublic = Field(description="the chosen method at the budget in force")
    basis: Literal["exact", "bound"] = Field(
        description="exact: the tensors the method trains; bound: a selection made during the run (green, "
        "topk by budget is exact), bounded by training every tensor it could reach"
    )
    device_type: Literal["cpu", "cuda"] = Field(
        description="the device the step was replayed for (cpu: eager attention; cuda: the model's own)"
    )
    world_size: int = Field(
        1,
        description="the ranks each job runs on (the workers' GT_WORKER_NPROC): the peaks are one rank's "
        "device (rank 0's, the largest), under the job's distributed engine (ddp: its rows of each batch "
        "and the trained tensors' gradient buckets; fsdp: a shard of every tensor)",
    )


class BasisPublic(BaseModel):
    basis: Literal["measured", "declared"] = Field(
        description="measured: fitted on finished epochs of the device profile; declared: the device "
        "profile's peak_flops, utilization and watts"
    )
    match: Literal["device+model+method", "device+model", "device"] | None = Field(
        description="which epochs: the most specific of same device profile, model and method; same device "
        "and model; same device (null when declared)"
    )
    epochs: int = Field(description="epochs fitted on (the latest, at most 50 per match; 0 when declared)")
    device: str = Field(description="the device profile's name")
    model: str | None = Field(description="the model matched (null: any model, or declared)")
    method: str | None = Field(description="the method matched (null: any method, or declared)")


class LearningRatePublic(BaseModel):
    learning_rate: float = Field(description="the AdamW peak learning rate the job trains at")
    auto: float = Field(description='the automatic rate (learning_rate "auto"): full x scale (greencore.lr)')
    multiplier: float = Field(description="learning_rate / auto (OpenAI's learning_rate_multiplier)")
    full: float = Field(description="full fine-tuning's automatic rate for this model and batch_size")
    scale: float = Field(
        description="the method's factor over full fine-tuning's rate at the budget in force"
    )
    non_embedding_params: int = Field(description="the model's parameters outside embedding tables")


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
    reselect_every: int | None = Field(
        None,
        description="green: epochs between tensor selections in force (the job's, or the automatic choice "
        "where it left it null); null for other methods",
    )
    flops: FlopsFullAndMethod = Field(description="FLOPs of the whole run")
    flops_saved: float = Field(description="1 - flops.method / flops.full")
    basis: Literal["budget", "profile", "approximate"] = Field(
        description="budget: the method spends at most rho * full (green, topk by rho); profile: the exact "
        "FLOPs of its fixed tensor set; approximate: LoRA adapters are not in the base profile"
    )
    time_s: FullAndMethod = Field(
        description="seconds of training (steps and importance passes; validation not) on the device "
        "profile, calibrated as time_basis says"
    )
    energy_j: FullAndMethod = Field(
        description="joules on the device profile, calibrated as energy_basis says"
    )
    gco2e: FullAndMethod = Field(description="grams CO2e at the configured grid intensity and PUE")
    peak_memory_bytes: FlopsFullAndMethod = Field(
        description="peak memory of the run (training step or importance evaluation, the larger), bytes"
    )
    memory: MemoryPublic = Field(description="the peaks in detail")
    minimum_budget: MinimumBudget
    device: DeviceProfile
    time_basis: BasisPublic = Field(description="what time_s rests on")
    energy_basis: BasisPublic = Field(description="what energy_j (and gco2e) rest on")
    learning_rate: LearningRatePublic = Field(
        description="the learning rate the job trains at, and the automatic rate it derives from"
    )
