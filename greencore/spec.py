"""What a training run is given (TrainSpec) and what it reports (EpochReport, TrainReport).

These are the contract between greencore.train and the service's worker: plain dataclasses of plain values,
so the worker can store them as JSON without knowing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, Literal

from greencore.registry import DEFAULT_METHOD

# The budget (share of full fine-tuning FLOPs) of a job that names none: within 1 point of full fine-tuning
# on the four MiniLM bench tasks at the automatic learning rate, and the smallest worst loss of the budgets
# measured (docs/training.md, "The default budget": no budget is within 1 point on all five tasks).
DEFAULT_RHO = 0.6
AUTO = "auto"  # a setting the run chooses (learning_rate: greencore.lr)
BUDGET_FIELDS = ("rho", "max_flops", "max_energy_kwh")  # one budget at most; the last two resolve to a rho


class Attention(StrEnum):
    """The attention implementation a run trains, profiles and evaluates with (``attention``)."""

    AUTO = "auto"  # what transformers picks: sdpa where the architecture supports it, else eager
    EAGER = "eager"  # the model's own matmuls and softmax
    SDPA = "sdpa"  # torch.nn.functional.scaled_dot_product_attention (fused kernels on CPU and CUDA)


class Precision(StrEnum):
    """What dtype a run holds its tensors in and computes with (``precision``; see greencore.precision)."""

    FP32 = "fp32"  # float32 everywhere
    BF16_MIXED = "bf16-mixed"  # float32 tensors, bf16 autocast
    BF16 = "bf16"  # bf16 frozen tensors, float32 trained ones (master weights, AdamW state), bf16 autocast


class Distributed(StrEnum):
    """How a run on several ranks splits the model (``distributed``; see docs/distributed.md)."""

    DDP = "ddp"  # every rank holds the whole model; the trained tensors' gradients are all-reduced
    FSDP = "fsdp"  # every rank holds a shard of each tensor (FSDP2): models that do not fit one device


class BudgetSchedule(StrEnum):
    """How green spends its rho over the run (``budget_schedule``; see greencore.reselect)."""

    EVEN = "even"  # every selection interval within rho (the paper's budget of an epoch)
    FRONT = "front"  # early intervals spend more, later ones less; the whole run within rho


class SpecError(ValueError):
    """A TrainSpec that cannot run: ``field`` names the offending setting."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def setting(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    limit: float | None = None,
) -> Any:
    """A hyperparameter: its default, what it means (the API's and CLI's help) and its bounds. ``ge``, ``gt``
    and ``le`` bound what can run at all (checked everywhere); ``limit`` is the largest value the service
    accepts (its schema's maximum), which a run of greencore alone may exceed."""
    return field(default=default, metadata={"doc": doc, "ge": ge, "gt": gt, "le": le, "limit": limit})


@dataclass
class Hyperparameters:
    """Every training setting, with its bounds: the one list the API's schema and the CLI's options derive
    from (``api.schemas.jobs``), checked by :meth:`check`."""

    n_epochs: int = setting(3, "passes over the training file", ge=1, limit=1000)
    batch_size: int = setting(8, "sequences per optimizer step", ge=1, limit=4096)
    learning_rate: float | Literal["auto"] = setting(
        AUTO,
        'AdamW peak learning rate; "auto": chosen for the model, batch and method (greencore.lr, '
        "docs/training.md)",
        gt=0,
        limit=1,
    )
    max_seq_len: int = setting(512, "tokens per example; longer ones are cut", ge=8, limit=131072)
    rho: float | None = setting(
        None,
        f"share of full fine-tuning FLOPs allowed (methods that take a budget); default {DEFAULT_RHO}",
        gt=0,
        le=1,
    )
    max_flops: float | None = setting(None, "instead of rho: FLOPs allowed for the whole run", gt=0)
    max_energy_kwh: float | None = setting(
        None, "instead of rho: energy allowed for the whole run, kWh on the device profile", gt=0
    )
    reselect_every: int | None = setting(
        None,
        "epochs between tensor selections (green); null: every epoch, or every few epochs where epochs are "
        "so short that importance passes would cost over a quarter of full fine-tuning of the steps served",
        ge=1,
        limit=1000,
    )
    budget_schedule: BudgetSchedule = setting(
        BudgetSchedule.EVEN,
        "how green spends rho over the run: even (every epoch within rho) or front (the first epoch up to "
        "1.2 x rho, falling linearly to 0.8 x rho in the last; the whole run within rho)",
    )
    warmup_steps: int = setting(0, "linear warmup steps, then linear decay to 0", ge=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0, limit=1)
    lora_r: int = setting(8, "LoRA rank (lora)", ge=1, limit=1024)
    lora_alpha: int = setting(16, "LoRA scaling numerator (lora)", ge=1, limit=65536)
    topk_layers: int | None = setting(None, "layers trained from the top (topk); 0: the head only", ge=0)
    importance_batches: int = setting(1, "batches importance is measured on (green)", ge=1, limit=64)
    importance_rows: int | None = setting(
        None,
        "rows of each importance batch that importance is measured on (green): fewer cost proportionally "
        "less; null: the whole batch",
        ge=1,
        limit=4096,
    )
    max_grad_norm: float | None = setting(1.0, "gradient clipping to this L2 norm; null: none", gt=0)
    bf16: bool = setting(False, "legacy: precision bf16-mixed on CUDA, nothing on CPU; use precision")
    precision: Precision = setting(
        Precision.FP32,
        "fp32; bf16-mixed (float32 tensors, bf16 autocast); or bf16 (frozen tensors held in bf16, trained "
        "ones in float32 with their AdamW state, bf16 autocast)",
    )
    gradient_checkpointing: bool = setting(
        False,
        "keep only each transformer layer's input and run its forward again in backward (less activation "
        "memory; the recompute is counted in the FLOPs and the budget)",
    )
    micro_batch_size: int | None = setting(
        None,
        "sequences per forward and backward; a step accumulates the gradients of batch_size / "
        "micro_batch_size of them (less activation memory, the same update); null: batch_size",
        ge=1,
        limit=4096,
    )
    attention: Attention = setting(
        Attention.AUTO,
        "attention implementation: auto (sdpa where the model supports it, else eager), eager or sdpa; "
        "the FLOPs budget counts the one the run uses",
    )
    distributed: Distributed = setting(
        Distributed.DDP,
        "on several ranks: ddp (each holds the whole model, gradients all-reduced) or fsdp (each holds a "
        "shard of every tensor, FSDP2: for models that do not fit one device; not with precision bf16); "
        "one process runs either alike",
    )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Raise :class:`SpecError` on a value out of its bounds, or on more than one budget."""
        for name, kind in (
            ("attention", Attention),
            ("precision", Precision),
            ("distributed", Distributed),
            ("budget_schedule", BudgetSchedule),
        ):
            if getattr(self, name) not in set(kind):
                raise SpecError(name, f"must be one of {', '.join(kind)}, not {getattr(self, name)!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (value == AUTO and f.name == "learning_rate"):
                continue
            if isinstance(value, str):  # the enums, checked above
                if f.name == "learning_rate":
                    raise SpecError(f.name, f'must be a number or "auto", not {value!r}')
                continue
            bounds = f.metadata
            if bounds["ge"] is not None and value < bounds["ge"]:
                raise SpecError(f.name, f"must be at least {bounds['ge']}")
            if bounds["gt"] is not None and value <= bounds["gt"]:
                raise SpecError(
                    f.name, "must be positive" if bounds["gt"] == 0 else f"must exceed {bounds['gt']}"
                )
            if bounds["le"] is not None and value > bounds["le"]:
                raise SpecError(f.name, f"must be at most {bounds['le']}")
        if self.distributed == Distributed.FSDP and self.precision == Precision.BF16:
            # bf16 holds frozen and trained tensors of one layer in different dtypes and switches a tensor's
            # dtype when it is chosen; FSDP2 gathers a layer as one buffer of one dtype, fixed at wrapping.
            raise SpecError("distributed", "fsdp does not run precision bf16; use bf16-mixed")
        given = [name for name in BUDGET_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise SpecError("hyperparameters", f"give one budget, not {' and '.join(given)}")


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
    method: str = DEFAULT_METHOD  # a name in greencore.registry.METHODS
    valid_file: str | None = None  # JSONL dataset for validation
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    seed: int = 0  # seeds initialisation, data order and dropout; CPU runs are bit-reproducible
    resume_from: str | None = None  # a checkpoint folder written by an earlier run of the same spec
    energy: EnergySettings = field(default_factory=EnergySettings)
    device: str | None = None  # "cuda", "cpu"; None: CUDA when present

    def check(self) -> None:
        """Raise :class:`SpecError` on a setting out of range or a method that cannot take it (files and model
        are checked when loaded)."""
        from greencore.registry import MethodError, method_info

        try:
            method_info(self.method)
        except MethodError as exc:
            raise SpecError("method", str(exc)) from exc
        self.hyperparameters.check()


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
    device_name: str = ""  # the device profile it ran on (EnergySettings.device_name); calibrates estimates
    world_size: int = 1  # ranks the epoch ran on (greencore.distributed)
    communication_bytes: int = 0  # bytes all-reduced (and broadcast) between the ranks
    communication_bytes_full: int = 0  # what full fine-tuning would all-reduce over the same steps
    learning_rate: float = 0.0  # the peak learning rate it trained at (the schedule's maximum)

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
