"""What a training run is given (TrainSpec) and what it reports (EpochReport, TrainReport).

These are the contract between greencore.train and the service's worker: plain dataclasses of plain values,
so the worker can store them as JSON without knowing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

METHODS = ("green", "full", "lora", "topk")


@dataclass
class Hyperparameters:
    n_epochs: int = 3  # passes over the training file
    batch_size: int = 8  # sequences per optimizer step
    learning_rate: float = 5e-5  # AdamW peak learning rate
    max_seq_len: int = 512  # tokens per example; longer ones are truncated (and counted)
    rho: float | None = None  # share of full fine-tuning FLOPs allowed (green, topk); None: green uses 0.5
    reselect_every: int = 1  # epochs between tensor selections (green)
    warmup_steps: int = 0  # linear warmup steps, then linear decay to 0
    weight_decay: float = 0.0  # AdamW weight decay
    lora_r: int = 8  # LoRA rank (lora)
    lora_alpha: int = 16  # LoRA scaling numerator (lora)
    topk_layers: int | None = None  # layers trained from the top (topk); None: the most that fit rho

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EnergySettings:
    carbon_intensity_g_per_kwh: float = 475.0  # grid intensity, gCO2e/kWh (world average)
    pue: float = 1.0  # data-centre power usage effectiveness
    # Device profile for the FLOPs-based estimate when no energy counter is readable.
    device_name: str = "cpu"
    peak_flops: float = 1.0e12  # FLOP/s the device can do at best
    utilization: float = 0.3  # share of peak reached in training
    watts: float = 65.0  # power drawn while training, W


@dataclass
class TrainSpec:
    model_dir: str  # a Hugging Face model folder (config, weights, tokenizer)
    train_file: str  # JSONL dataset
    output_dir: str  # checkpoints go to output_dir/epoch-N and output_dir/final
    method: str = "green"  # one of METHODS
    valid_file: str | None = None  # JSONL dataset for validation
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    seed: int = 0
    resume_from: str | None = None  # a checkpoint folder written by an earlier run of the same spec
    energy: EnergySettings = field(default_factory=EnergySettings)
    device: str | None = None  # "cuda", "cpu"; None: CUDA when present


@dataclass
class EpochReport:
    """What one epoch spent and achieved. FLOPs as FlopCounterMode counts them (a multiply-add is 2)."""

    epoch: int  # 1-based
    selected_tensors: list[str]  # tensors trained in this epoch
    flops: dict[str, int]  # fwd, bwd_act, bwd_weight, selection, total, full, predicted_step, measured_step
    rho_achieved: float  # flops.total / flops.full
    tokens: int  # tokens processed in training steps
    wall_s: float
    train_loss: float
    valid_loss: float | None
    valid_accuracy: float | None  # classification
    valid_token_accuracy: float | None  # generation
    energy_j: float
    energy_method: str  # "nvml", "rapl" or "estimate"
    gco2e: float
    steps: int = 0  # optimizer steps in this epoch
    truncated_examples: int = 0  # examples cut at max_seq_len
    checkpoint_dir: str | None = None  # where this epoch's checkpoint was written

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainReport:
    epochs: list[EpochReport]
    final_checkpoint_dir: str | None
    stopped: bool  # should_stop() ended the run early
    task: str  # "causal_lm", "seq2seq" or "classification"
    method: str
    rho: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
