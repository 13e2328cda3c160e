"""The training run behind a job: ``train(spec, on_epoch, should_stop, on_step) -> TrainReport``.

One loop for every method (green, full, lora, topk) and every task (causal LM, seq2seq, classification):

1. Read and validate the data; the task follows from its format and the model's config.
2. Load the model in float32 (saved back in the base's dtypes), let the method prepare it (LoRA wraps it).
3. Each epoch: plan its batches (a pure function of seed and epoch), profile each batch shape once, let the
   method choose the tensors to train (GreenTrainer: importance + selection within rho), train only those,
   measure the first step with FlopCounterMode beside the profile's prediction, validate, meter energy,
   checkpoint atomically, and hand the EpochReport to ``on_epoch``.

FLOPs are FlopCounterMode's (a multiply-add is 2). On CPU the model runs eager attention, which is what the
profile counts (FlopCounterMode counts 0 for CPU SDPA); on CUDA the model keeps its own attention kernel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from greencore import checkpoint
from greencore.data import (
    IGNORE,
    DatasetError,
    Encoded,
    batch_shape,
    collate,
    encode_dataset,
    epoch_batches,
    task_for,
    validate_dataset,
)
from greencore.energy import EnergyMeter, grams_co2e
from greencore.flops import StepFlops
from greencore.importance import tentative_optimizer_factory
from greencore.methods import Choice, EpochContext, make_method, rho_of
from greencore.models import ModelFolderError, load_config
from greencore.profile import TensorProfile, eager_attention, profile_model
from greencore.spec import EpochReport, TrainReport, TrainSpec


def auto_class(task: str) -> type:
    """The transformers Auto class that loads a model for ``task`` (imported here: `import greencore` stays light)."""
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "classification": transformers.AutoModelForSequenceClassification,
    }[task]


OnEpoch = Callable[[EpochReport], None]
ShouldStop = Callable[[], bool]
OnStep = Callable[[int, int, int], None]


def train(
    spec: TrainSpec,
    on_epoch: OnEpoch | None = None,
    should_stop: ShouldStop | None = None,
    on_step: OnStep | None = None,
) -> TrainReport:
    """Fine-tune ``spec.model_dir`` on ``spec.train_file`` with ``spec.method``; checkpoint every epoch.

    ``on_epoch(report)`` gets each EpochReport as soon as its epoch is checkpointed. ``should_stop()`` is asked
    before every step: True ends the run at once, keeping the last checkpoint (``TrainReport.stopped``).
    ``on_step(epoch, step, steps_in_epoch)`` follows progress (1-based). With ``spec.resume_from`` (an
    ``epoch-N`` folder of an earlier run of the same spec) the run continues after epoch N exactly as if it
    had never stopped; the report then holds the earlier epochs too.
    Raises SpecError, DatasetError, ModelFolderError, MethodError, CheckpointError or BudgetTooSmall on bad
    input, before anything trains.
    """
    spec.check()
    hp = spec.hyperparameters
    device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = load_config(spec.model_dir)
    tokenizer = _load_tokenizer(spec.model_dir)

    train_summary = validate_dataset(spec.train_file)
    valid_summary = validate_dataset(spec.valid_file) if spec.valid_file else None
    if valid_summary is not None and valid_summary.format != train_summary.format:
        raise DatasetError(
            None,
            None,
            f"the validation file is {valid_summary.format}, the training file {train_summary.format}",
        )
    task = task_for(train_summary.format, config)
    labels = train_summary.labels
    label2id = {name: i for i, name in enumerate(labels)} if labels else None
    train_data = encode_dataset(train_summary, tokenizer, task, hp.max_seq_len, label2id)
    valid_data = (
        encode_dataset(valid_summary, tokenizer, task, hp.max_seq_len, label2id) if valid_summary else None
    )
    if not len(train_data):
        raise DatasetError(None, None, "no example keeps a completion token within max_seq_len")

    fingerprint = _fingerprint(spec)
    state = checkpoint.load_state(spec.resume_from) if spec.resume_from else None
    if state is not None and state["fingerprint"] != fingerprint:
        raise checkpoint.CheckpointError(
            f"{spec.resume_from} was written by a different job (model, data, method or hyperparameters differ)"
        )

    torch.manual_seed(spec.seed)
    method = make_method(spec.method, hp)
    model, new_modules = _load_model(spec, task, labels, tokenizer, state, device, method.name)
    model, params = method.prepare(model, new_modules)
    if state is not None and method.name == "lora":
        checkpoint.restore_adapter(model, spec.resume_from)
    model.to(device)

    steps_per_epoch = math.ceil(len(train_data) / hp.batch_size)
    total_steps = steps_per_epoch * hp.n_epochs
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(hp.warmup_steps, total_steps))
    dtypes = checkpoint.base_dtypes(spec.model_dir)
    default_dtype = getattr(config, "dtype", None) or torch.float32
    default_dtype = getattr(torch, default_dtype) if isinstance(default_dtype, str) else default_dtype

    reports: list[EpochReport] = []
    choice: Choice | None = None
    trained: set[str] = set()  # every tensor trained so far (their saved values differ from the base)
    start_epoch = 1
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        choice = Choice(tuple(state["selection"]), 0, state.get("selection_details", {}))
        trained = set(state["trained"])
        reports = [EpochReport(**r) for r in state["reports"]]
        start_epoch = state["epoch"] + 1

    profiles = _ShapeProfiles(model, lora=method.name == "lora")
    meter = EnergyMeter(str(device), spec.energy)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if hp.bf16 and device.type == "cuda"
        else contextlib.nullcontext()
    )
    attention = eager_attention(model) if device.type == "cpu" else contextlib.nullcontext()
    pad_id = tokenizer.pad_token_id
    last_dir = Path(spec.resume_from) if spec.resume_from else None
    stopped = False

    def make_batch(indices: list[int]) -> dict[str, torch.Tensor]:
        return _to(collate(train_data, indices, pad_id, hp.max_seq_len), device)

    def shapes_of(epoch: int) -> list[tuple[int, ...]]:
        return [batch_shape(train_data, idx, hp.max_seq_len) for idx in _order(train_data, spec, epoch)]

    def steps_profile(shapes: list[tuple[int, ...]]) -> tuple[TensorProfile, int]:
        """Steps of these batch shapes combined, and what full fine-tuning of the base would spend on them."""
        counts = {s: shapes.count(s) for s in dict.fromkeys(shapes)}
        combined = TensorProfile.combine([(profiles.get(s), n) for s, n in counts.items()])
        return combined, sum(profiles.full(s) * n for s, n in counts.items())

    with attention:
        for epoch in range(start_epoch, hp.n_epochs + 1):
            if should_stop is not None and should_stop():
                stopped = True
                break
            started = time.perf_counter()
            meter.start()
            order = _order(train_data, spec, epoch)
            shapes = [batch_shape(train_data, idx, hp.max_seq_len) for idx in order]
            profile, full_flops = steps_profile(shapes)
            n_imp = min(hp.importance_batches, len(order))
            ctx = EpochContext(
                epoch=epoch,
                model=model,
                profile=profile,
                rest_profile=steps_profile(shapes[1:])[0] if n_imp == 1 and len(order) > 1 else None,
                full_flops=full_flops,
                later=lambda e0=epoch: [
                    steps_profile(shapes_of(e))
                    for e in range(e0 + 1, min(e0 + hp.reselect_every, hp.n_epochs + 1))
                ],
                importance_batches=[make_batch(idx) for idx in order[:n_imp]],
                importance_profiles=[profiles.get(s) for s in shapes[:n_imp]],
                # The tentative step of the importance pass is the training optimizer's next step (a copy of it:
                # its moments and the scheduled learning rate), as in the paper's code.
                optimizer_factory=tentative_optimizer_factory(optimizer),
            )
            new_choice = method.choose(ctx)
            selection_flops = new_choice.selection_flops if new_choice is not None else 0
            choice = new_choice or choice
            assert choice is not None, "every method chooses in the first epoch"
            chosen = set(choice.names)
            for name, param in model.named_parameters():
                param.requires_grad_(name in chosen)
            trained |= chosen

            first = new_choice.first_step if new_choice is not None else None
            if first is not None:  # the importance pass computed the first batch's step: take it
                named = dict(model.named_parameters())
                for name, grad in first.gradients.items():
                    named[name].grad = grad
                _optimizer_step(params, optimizer, scheduler, hp)
            steps = _run_steps(
                model,
                params,
                optimizer,
                scheduler,
                order,
                make_batch,
                task,
                epoch,
                bool(chosen),
                hp,
                autocast,
                should_stop,
                on_step,
                first=(first.loss, ctx.importance_batches[0]) if first else None,
            )
            if steps.stopped:
                stopped = True
                break

            # An epoch that trains nothing runs no step, not even a forward: it costs only its selection. The
            # loop's steps are the epoch's, less the first when the importance pass took it.
            looped = ctx.rest_profile if first is not None else profile
            train_flops = looped.step_flops(choice.names) if chosen else StepFlops(0, 0, 0)
            first_looped = shapes[1] if first is not None else shapes[0]
            total = train_flops.total + selection_flops
            valid_started = time.perf_counter()
            valid_loss, valid_acc = _evaluate(model, valid_data, pad_id, hp, device, autocast)
            wall_s = time.perf_counter() - started
            valid_wall_s = time.perf_counter() - valid_started
            energy = meter.stop(total)
            report = EpochReport(
                epoch=epoch,
                selected_tensors=list(choice.names),
                flops={
                    "fwd": train_flops.fwd,
                    "bwd_act": train_flops.bwd_act,
                    "bwd_weight": train_flops.bwd_weight,
                    "selection": selection_flops,
                    "total": total,
                    "full": full_flops,
                    "predicted_step": profiles.get(first_looped).step_flops(choice.names).total
                    if chosen
                    else 0,
                    "measured_step": steps.measured_flops,
                },
                rho_achieved=total / full_flops,
                tokens=steps.tokens,
                wall_s=wall_s,
                valid_wall_s=valid_wall_s,
                train_loss=steps.mean_loss,
                valid_loss=valid_loss,
                valid_accuracy=valid_acc if task == "classification" else None,
                valid_token_accuracy=valid_acc if task != "classification" else None,
                energy_j=energy.energy_j,
                energy_method=energy.method,
                gco2e=grams_co2e(energy.energy_j, spec.energy),
                steps=steps.steps,
                truncated_examples=train_data.truncated,
                energy_inputs=energy.inputs,
                selection={**_plain(choice.details), "reselected": new_choice is not None},
                dropped_examples=train_data.dropped,
            )
            last_dir = checkpoint.epoch_dir(spec.output_dir, epoch)
            report.checkpoint_dir = str(last_dir)
            reports.append(report)
            state = {
                "fingerprint": fingerprint,
                "epoch": epoch,
                "global_step": epoch * steps_per_epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                },
                "selection": list(choice.names),
                "selection_details": _plain(choice.details),
                "trained": sorted(trained),
                "reports": [_plain(asdict(r)) for r in reports],
            }
            narrow = [n for n in sorted(trained) if _saved_dtype(n, dtypes, default_dtype) != torch.float32]
            checkpoint.save_checkpoint(
                last_dir,
                model,
                tokenizer,
                dtypes,
                default_dtype,
                state,
                master_names=narrow if method.name != "lora" else (),
            )
            if on_epoch is not None:
                on_epoch(report)

    final = None
    if not stopped and last_dir is not None:
        final = str(checkpoint.link_final(spec.output_dir, last_dir))
    rho = (
        rho_of(hp) if method.name == "green" or (method.name == "topk" and hp.topk_layers is None) else hp.rho
    )
    return TrainReport(reports, final, stopped, task, method.name, rho, labels)


LOSS_CHECK_EVERY = 16  # steps between checks that the training loss is still finite


class LossNotFinite(RuntimeError):
    """The training loss became NaN or infinite: the run stops before it saves weights that are garbage."""


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not bool(torch.isfinite(loss_sum)):
        raise LossNotFinite(
            f"the training loss became {loss_sum.item()} in epoch {epoch} (by step {step}): training diverged; "
            "lower learning_rate (or use bf16/fp32 weights); the checkpoints of earlier epochs are kept"
        )


@dataclass
class _EpochSteps:
    steps: int  # optimizer steps taken
    tokens: int  # real tokens in the epoch's batches
    mean_loss: float | None  # None when nothing trained
    measured_flops: int  # FlopCounterMode's count of the first step
    stopped: bool  # should_stop() said so before the epoch ended


def _run_steps(
    model: nn.Module,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    order: list[list[int]],
    make_batch: Callable[[list[int]], dict[str, torch.Tensor]],
    task: str,
    epoch: int,
    trains: bool,
    hp: Any,
    autocast: Any,
    should_stop: ShouldStop | None,
    on_step: OnStep | None,
    first: tuple[float, dict[str, torch.Tensor]] | None = None,
) -> _EpochSteps:
    """One epoch's optimizer steps over the batches of ``order``; the first the loop runs is measured under
    FlopCounterMode. ``first``: (loss, batch) of the first batch, whose step was already taken (from the
    importance pass); the loop starts at the second."""
    model.train()
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    tokens = measured = 0
    skip = 0
    if first is not None:
        skip = 1
        loss_sum += first[0]
        tokens += _tokens(first[1], task)
        if on_step is not None:
            on_step(epoch, 1, len(order))
    for step, idx in enumerate(order[skip:], start=1 + skip):
        if should_stop is not None and should_stop():
            return _EpochSteps(step - 1, tokens, None, measured, stopped=True)
        batch = make_batch(idx)
        tokens += _tokens(batch, task)
        if trains:  # else nothing fits the budget: the epoch trains nothing
            counter = FlopCounterMode(display=False) if step == 1 + skip else contextlib.nullcontext()
            with counter:
                with autocast:
                    loss = model(**batch).loss
                loss.backward()
            if step == 1 + skip:
                measured = int(counter.get_total_flops())
            _optimizer_step(params, optimizer, scheduler, hp)
            loss_sum += loss.detach().float()
            if step % LOSS_CHECK_EVERY == 0 or step == len(order):  # a read syncs a GPU: not every step
                _check_finite(loss_sum, epoch, step)
        if on_step is not None:
            on_step(epoch, step, len(order))
    mean = loss_sum.item() / len(order) if trains else None
    return _EpochSteps(len(order) if trains else 0, tokens, mean, measured, stopped=False)


def _optimizer_step(
    params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any, hp: Any
) -> None:
    """One training step from the gradients in ``.grad``: clip, step, schedule, clear."""
    if hp.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], hp.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out and carry no loss, so any token will do; the end-of-sequence one
        # is the usual choice.
        if tokenizer.eos_token is None:
            raise ModelFolderError(f"the tokenizer in {model_dir} has neither a padding nor an end token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(
    spec: TrainSpec,
    task: str,
    labels: list[str] | None,
    tokenizer: Any,
    state: dict | None,
    device: torch.device,
    method: str,
) -> tuple[nn.Module, list[str]]:
    """The model to train, in float32 (eager attention on CPU), and the modules the base did not have.

    A resumed full/green/topk run loads the checkpoint's weights (and the float32 master copies of trained
    tensors); a resumed LoRA run loads the base, and the adapter is restored after wrapping.
    """
    source = spec.resume_from if state is not None and method != "lora" else spec.model_dir
    kwargs: dict[str, Any] = {"dtype": torch.float32, "local_files_only": True}
    if device.type == "cpu":
        kwargs["attn_implementation"] = "eager"
    if task == "classification":
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
            ignore_mismatched_sizes=True,
        )
    try:
        model, info = auto_class(task).from_pretrained(source, output_loading_info=True, **kwargs)
    except (
        OSError,
        ValueError,
        KeyError,
        SafetensorError,
    ) as exc:  # SafetensorError: a weights file cut short
        raise ModelFolderError(f"cannot load {source} as a {task} model: {exc}") from exc
    if state is not None and method != "lora":
        checkpoint.restore_master_weights(model, spec.resume_from)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # classifiers find the last real token by it
    fresh = list(info.get("missing_keys", [])) + [k for k, *_ in info.get("mismatched_keys", [])]
    new_modules = sorted({key.rsplit(".", 1)[0] for key in fresh if "." in key})
    return model, new_modules


def _order(data: Encoded, spec: TrainSpec, epoch: int) -> list[list[int]]:
    hp = spec.hyperparameters
    return epoch_batches(data, hp.batch_size, spec.seed, epoch, hp.max_seq_len, hp.importance_batches)


# Profiles by model structure and batch shape, kept across runs in this process: a profile depends on the
# architecture, the config and the shape, never on the weights, so a worker training one base model job after
# job traces each shape once.
_PROFILE_CACHE: OrderedDict[tuple, TensorProfile] = OrderedDict()
PROFILE_CACHE_SIZE = 512  # profiles kept (each holds a few hundred cost terms)


def clear_profile_cache() -> None:
    """Forget every cached profile (a benchmark charging each run its own profiling)."""
    _PROFILE_CACHE.clear()


def _structure(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    params = [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    return hashlib.sha256(
        repr(
            (
                type(model).__qualname__,
                repr(model),
                params,
                config.to_json_string() if config is not None else None,
            )
        ).encode()
    ).hexdigest()


def _profile(model: nn.Module, structure: str, shape: tuple[int, ...]) -> TensorProfile:
    key = (structure, shape)
    if key in _PROFILE_CACHE:
        _PROFILE_CACHE.move_to_end(key)
        return _PROFILE_CACHE[key]
    profile = profile_model(model, shape[0], shape[1], shape[2] if len(shape) > 2 else None)
    _PROFILE_CACHE[key] = profile
    while len(_PROFILE_CACHE) > PROFILE_CACHE_SIZE:
        _PROFILE_CACHE.popitem(last=False)
    return profile


class _ShapeProfiles:
    """Profiles of the training model by batch shape, and full fine-tuning's step FLOPs of the base model."""

    def __init__(self, model: nn.Module, lora: bool) -> None:
        self.model = model
        self.lora = lora
        self.structure = _structure(model)
        self._base_structure: str | None = None

    def get(self, shape: tuple[int, ...]) -> TensorProfile:
        return _profile(self.model, self.structure, shape)

    def full(self, shape: tuple[int, ...]) -> int:
        if not self.lora:
            return self.get(shape).full.total
        # Full fine-tuning of the base: the same model with its adapters switched off.
        with self.model.disable_adapter():
            self._base_structure = self._base_structure or "base:" + self.structure
            return _profile(self.model, self._base_structure, shape).full.total


def _linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _tokens(batch: dict[str, torch.Tensor], task: str) -> int:
    """Real (unpadded) tokens of a batch: inputs, plus targets for seq2seq."""
    n = int(batch["attention_mask"].sum())
    if task == "seq2seq":
        n += int((batch["labels"] != IGNORE).sum())
    return n


@torch.no_grad()
def _evaluate(
    model: nn.Module, data: Encoded | None, pad_id: int, hp: Any, device: torch.device, autocast: Any
) -> tuple[float | None, float | None]:
    """Validation loss (mean per example for classification, per target token otherwise) and accuracy
    (share of examples, or of target tokens predicted right). (None, None) without validation data."""
    if data is None or not len(data):
        return None, None
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    right = count = 0
    for start in range(0, len(data), hp.batch_size):
        idx = list(range(start, min(start + hp.batch_size, len(data))))
        batch = _to(collate(data, idx, pad_id, hp.max_seq_len), device)
        labels = batch.pop("labels")
        if data.task == "seq2seq":
            batch["labels"] = labels  # the decoder's inputs are the targets shifted right
        with autocast:
            logits = model(**batch).logits.float()
        if data.task == "classification":
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            right += int((logits.argmax(-1) == labels).sum())
            count += len(idx)
            continue
        if data.task == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        keep = labels != IGNORE
        loss_sum += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        right += int((logits.argmax(-1)[keep] == labels[keep]).sum())
        count += int(keep.sum())
    model.train(was_training)
    return loss_sum / max(count, 1), right / max(count, 1)


def _saved_dtype(name: str, dtypes: dict[str, torch.dtype], default: torch.dtype) -> torch.dtype:
    return dtypes.get(name, default)


def _plain(value: Any) -> Any:
    """Only plain JSON-able values (so training_state.pt loads with weights_only=True)."""
    return json.loads(json.dumps(value, default=str))


def _digest(path: str | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(spec: TrainSpec) -> str:
    """What a checkpoint must have been trained with to be resumed by ``spec``."""
    what = {
        "model": str(Path(spec.model_dir).resolve()),
        "train": _digest(spec.train_file),
        "valid": _digest(spec.valid_file),
        "method": spec.method,
        "hyperparameters": spec.hyperparameters.as_dict(),
        "seed": spec.seed,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
