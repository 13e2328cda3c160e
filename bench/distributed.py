"""Benchmark: green-0.5 against full fine-tuning on 2 ranks (torch.distributed, gloo, two CPU processes),
with DDP and with FSDP2 (``distributed: fsdp``), per epoch: the bytes communicated between the ranks, the step
time, and the distance to one process's weights.

Run: .venv/bin/python bench/distributed.py   (writes bench/results/distributed.md)
On N GPUs (NCCL, one rank per GPU): ``--device cuda --nproc N``, as bench/gpu_distributed.sh runs it.

A Llama-shaped causal LM built from a config (random weights; ``--hidden``, ``--layers``), trained on
generated prompt/completion examples (tests/model_folders.dataset) for ``--epochs`` epochs at batch
``--batch-size``, as ``greentrainer train --nproc 2`` runs it (greencore.train on torchrun's environment), and
once as one process on the same spec. Targets (issue 17): green's bytes <= 0.5 of full's (DDP; FSDP2 gathers
every tensor in every forward whatever trains, so green saves only the frozen tensors' reduce-scatter and the
backward gathers below the deepest trained layer); equality with one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from greencore.spec import Hyperparameters, TrainSpec  # noqa: E402
from greencore.train import train  # noqa: E402
from tests.model_folders import dataset, write_jsonl  # noqa: E402
from tests.processes import free_port  # noqa: E402


def spec(root: Path, out: str, method: str, args: argparse.Namespace, engine: str = "ddp") -> TrainSpec:
    hp = {
        "n_epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": 1e-3,
        "max_seq_len": args.seq_len,
        "distributed": engine,
    }
    if method == "green":
        hp["rho"] = 0.5
    return TrainSpec(
        model_dir=str(root / "model"),
        train_file=str(root / "train.jsonl"),
        valid_file=str(root / "valid.jsonl"),
        output_dir=str(root / out),
        method=method,
        hyperparameters=Hyperparameters(**hp),
        seed=1,
        device=args.device,
    )


def rank_main(
    rank: int, port: int, root: str, engine: str, methods: list[str], args: argparse.Namespace
) -> None:
    """One rank: every method's run with ``engine`` in turn, in one process group (one launch per engine, its
    imports paid once)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(args.nproc),
        GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    for method in methods:
        out = f"{method}-{engine}"
        report = train(spec(Path(root), out, method, args, engine))
        if rank == 0:
            (Path(root) / f"{out}.json").write_text(json.dumps(report.as_dict()))
    dist.destroy_process_group()


def build_model(folder: Path, hidden: int, layers: int) -> None:
    """A Llama-shaped causal LM with the demo tokenizer (greencore.demo), random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from greencore.demo import build_tokenizer

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(4, hidden // 64),  # heads of 64 (SDPA's fused kernels)
        num_key_value_heads=max(2, hidden // 128),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def epoch_rows(
    method: str, engine: str, one: dict, two: dict, run_s: tuple[float, float]
) -> list[dict[str, object]]:
    """One row per epoch of the 2-rank run ``two`` against the one-process run ``one``."""
    wa, wb = weights(one["final_checkpoint_dir"]), weights(two["final_checkpoint_dir"])
    diff = max(float((wa[n] - wb[n]).abs().max()) for n in wa)
    same = all(
        a["selected_tensors"] == b["selected_tensors"] and a["flops"] == b["flops"]
        for a, b in zip(one["epochs"], two["epochs"], strict=True)
    )
    return [
        {
            "method": "green-0.5" if method == "green" else "full",
            "engine": engine,
            "epoch": e2["epoch"],
            "tensors": len(e2["selected_tensors"]),
            "bytes": e2["communication_bytes"],
            "full_bytes": e2["communication_bytes_full"],
            "steps": e2["steps"],
            "step_ms_two": 1000 * (e2["wall_s"] - e2["valid_wall_s"]) / max(e2["steps"], 1),
            "step_ms_one": 1000 * (e1["wall_s"] - e1["valid_wall_s"]) / max(e1["steps"], 1),
            "rho": e2["rho_achieved"],
            "same": same,
            "diff": diff,
            "run_s": run_s,
        }
        for e1, e2 in zip(one["epochs"], two["epochs"], strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128, help="max_seq_len")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (one per GPU with --device cuda)")
    parser.add_argument("--device", default=None, help="cpu (gloo) or cuda (NCCL); unset: CUDA when present")
    parser.add_argument("--engines", nargs="+", choices=("ddp", "fsdp"), default=["ddp", "fsdp"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distributed.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="gt-bench-distributed-"))
    build_model(root / "model", args.hidden, args.layers)
    write_jsonl(root / "train.jsonl", dataset("prompt_completion", args.examples, seed=0, long_every=8))
    write_jsonl(root / "valid.jsonl", dataset("prompt_completion", 16, seed=1))
    rows = []
    methods = ["full", "green"]
    ones, one_s = {}, {}
    for method in methods:
        started = time.perf_counter()
        ones[method] = train(spec(root, f"{method}-one", method, args)).as_dict()
        one_s[method] = time.perf_counter() - started
    for engine in args.engines:
        started = time.perf_counter()
        mp.spawn(rank_main, args=(free_port(), str(root), engine, methods, args), nprocs=args.nproc)
        two_s = time.perf_counter() - started
        for method in methods:
            two = json.loads((root / f"{method}-{engine}.json").read_text())
            rows += epoch_rows(method, engine, ones[method], two, (one_s[method], two_s))
    full_bytes = {(r["engine"], r["epoch"]): r["bytes"] for r in rows if r["method"] == "full"}
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    where = (
        f"{args.nproc} x {torch.cuda.get_device_name()}, NCCL"
        if cuda
        else f"{os.cpu_count()} cores, gloo, one thread per process"
    )
    lines = [
        f"# Distributed green: {args.nproc} ranks ({'NCCL, CUDA' if cuda else 'gloo, CPU'}), "
        f"{' and '.join(e.upper() if e == 'ddp' else 'FSDP2' for e in args.engines)}, against one process",
        "",
        f"Command: `.venv/bin/python bench/distributed.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {platform.machine()}, {where}, torch {torch.__version__}. Model: Llama-shaped, width "
        f"{args.hidden}, {args.layers} layers (random weights); {args.examples} examples, batch "
        f"{args.batch_size} ({args.batch_size // args.nproc} rows per rank), max_seq_len {args.seq_len}, "
        f"{args.epochs} epochs.",
        "",
        "Bytes: what the ranks communicated in the epoch, counted where it is sent: DDP's all-reduces (a "
        "communication hook) and the broadcast of a choice's first-step gradients; FSDP2's all-gathers "
        "and reduce-scatters (its custom collectives), importance passes and validation included. Full FT "
        "bytes: what full fine-tuning would exchange on the same steps (DDP: a float32 gradient of every "
        "parameter per step; FSDP2: each pass's all-gathers, every gradient reduce-scattered, the same "
        "validation). / full's bytes: against the full run's measured bytes, same engine. "
        "Step ms: training wall time (selection included, validation not) "
        "per step. Same as 1 process: the same selected tensors and FLOPs records every epoch; max abs "
        "weight diff: the largest difference of a final weight from one process's.",
        "",
        "| engine | method | epoch | tensors | bytes | / full's bytes | / full FT bytes "
        f"| step ms, {args.nproc} ranks | step ms, 1 process | rho achieved | same as 1 process "
        "| max abs weight diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {r['method']} | {r['epoch']} | {r['tensors']} | {r['bytes']:,} | "
            f"{r['bytes'] / full_bytes[r['engine'], r['epoch']]:.3f} | {r['bytes'] / r['full_bytes']:.3f} | "
            f"{r['step_ms_two']:.1f} | {r['step_ms_one']:.1f} | {r['rho']:.3f} | "
            f"{'yes' if r['same'] else 'no'} | {r['diff']:.2e} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
