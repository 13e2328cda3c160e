"""What a training run is given (TrainSpec) and what it reports (EpochReport, TrainReport).

These are the contract between greencore.train and the service's worker: plain dataclasses of plain values,
so the worker can store them as JSON without knowing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

METHODS = ("green", "full", "lora", "topk")


class SpecError(ValueError):
    """A TrainSpec that cannot run: ``field`` names the offending setting."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass
class Hyperparameters:
    n_epochs: int = 3  # passes over the training file
    batch_size: int = 8  # sequences per optimizer step
    learning_rate: float = 5e-5  # AdamW peak learning rate
    max_seq_len: int = 512  # tokens per example; longer ones are truncated (and counted)
    rho: float | None = None  # share of full fine-tuning FLOPs allowed (green, topk); None: 0.5
    reselect_every: int = 1  # epochs between tensor selections (green)
    warmup_steps: int = 0  # linear warmup steps, then linear decay to 0
    weight_decay: float = 0.0  # AdamW weight decay
    lora_r: int = 8  # LoRA rank (lora)
    lora_alpha: int = 16  # LoRA scaling numerator (lora)
    topk_layers: int | None = None  # layers trained from the top (topk); None: the most that fit rho
    importance_batches: int = (
        1  # batches at the start of a selecting epoch that importance is measured on (green)
    )
    max_grad_norm: float | None = 1.0  # gradients clipped to this global L2 norm; None: no clipping
    bf16: bool = False  # bf16 autocast on CUDA (weights and optimizer stay float32); ignored on CPU

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EnergySettings:
    carbon_intensity_g_per_kwh: float = 475.0  # grid intensity, gCO2e/kWh (world average)
    pue: float = 1.0  # data-centre power usage effectiveness
    # Device profile for the FLOPs-based estimate when no energy counter is readable.
    device_name: str = "cpu"  # a label for the declared device, recorded with the estimate
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
    seed: int = 0  # seeds initialisation, data order and dropout; CPU runs are bit-reproducible
    resume_from: str | None = None  # a checkpoint folder written by an earlier run of the same spec
    energy: EnergySettings = field(default_factory=EnergySettings)
    device: str | None = None  # "cuda", "cpu"; None: CUDA when present

    def check(self) -> None:
        """Raise :class:`SpecError` on a setting out of range (files and model are checked when loaded)."""
        hp = self.hyperparameters
        if self.method not in METHODS:
            raise SpecError("method", f"unknown method {self.method!r}; one of {', '.join(METHODS)}")
        for name in (
            "n_epochs",
            "batch_size",
            "max_seq_len",
            "reselect_every",
            "lora_r",
            "importance_batches",
        ):
            if getattr(hp, name) < 1:
                raise SpecError(name, "must be at least 1")
        if hp.learning_rate <= 0:
            raise SpecError("learning_rate", "must be positive")
        if hp.warmup_steps < 0 or hp.weight_decay < 0:
            raise SpecError("warmup_steps" if hp.warmup_steps < 0 else "weight_decay", "must not be negative")
        if hp.rho is not None and not 0 < hp.rho <= 1:
            raise SpecError("rho", "must be in (0, 1]")
        if hp.topk_layers is not None and hp.topk_layers < 0:
            raise SpecError("topk_layers", "must not be negative")
        if hp.max_grad_norm is not None and hp.max_grad_norm <= 0:
            raise SpecError("max_grad_norm", "must be positive")


@dataclass
class EpochReport:
    """What one epoch spent and achieved. FLOPs as FlopCounterMode counts them (a multiply-add is 2)."""

    epoch: int  # 1-based
    selected_tensors: list[str]  # tensors trained in this epoch
    flops: dict[str, int]  # fwd, bwd_act, bwd_weight, selection, total, full, predicted_step, measured_step
    rho_achieved: float  # flops.total / flops.full
    tokens: int  # tokens processed in training steps
    wall_s: float  # seconds from the epoch's start through validation (selection included, checkpoint not)
    train_loss: float | None  # mean loss of the epoch's steps; None when the selection trained nothing
    valid_loss: float | None
    valid_accuracy: float | None  # classification
    valid_token_accuracy: float | None  # generation
    energy_j: float
    energy_method: str  # "nvml", "rapl" or "estimate"
    gco2e: float
    steps: int = 0  # optimizer steps in this epoch
    truncated_examples: int = 0  # examples cut at max_seq_len
    checkpoint_dir: str | None = None  # where this epoch's checkpoint was written
    energy_inputs: dict[str, Any] = field(
        default_factory=dict
    )  # what the estimate used (energy_method "estimate")
    selection: dict[str, Any] = field(default_factory=dict)  # how the tensors were chosen (method details)
    dropped_examples: int = 0  # examples left with no loss token after truncation, not trained on
    valid_wall_s: float = 0.0  # the part of wall_s spent on validation

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
    labels: list[str] | None = None  # classification: label names in id order (config id2label)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
