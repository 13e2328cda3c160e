"""Two ranks (torch.distributed, gloo, two CPU processes) against one process on the same spec: the same
selections every epoch, the same FLOPs records, losses and final weights within float rounding, tensors never
selected bit-identical to the base, and exactly the selected tensors' bytes communicated per step (DDP). The
same with FSDP2 (``distributed: fsdp``): the selection changes without wrapping anew, and the checkpoint is
one process's (a Hugging Face folder of full tensors, the optimizer's state whole)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from greencore.spec import Hyperparameters, TrainSpec
from greencore.train import train
from tests.model_folders import dataset, model_folder, write_jsonl
from tests.processes import free_port

pytestmark = pytest.mark.usefixtures("one_thread")
WORLD = 2


def _spec(root: Path, out: str, **hp) -> TrainSpec:
    settings = {"n_epochs": 3, "batch_size": 4, "learning_rate": 1e-3, "max_seq_len": 96, "rho": 0.6, **hp}
    return TrainSpec(
        model_dir=str(root / "llama"),
        train_file=str(root / "train.jsonl"),
        valid_file=str(root / "valid.jsonl"),
        output_dir=str(root / out),
        method="green",
        hyperparameters=Hyperparameters(**settings),
        seed=3,
    )


def _rank(rank: int, port: int, root: str, out: str, hp: dict, sticky: bool) -> None:
    """One rank of a run (torch.multiprocessing.spawn's target): the environment torchrun would set."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        GLOO_SOCKET_IFNAME="lo",
        GT_DIST_TIMEOUT_S="120",
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    import greencore.train

    if sticky:  # the trap: one wrapper for the whole run, however the selection changes
        first: list = []
        real = greencore.train.wrap

        def wrap_once(model, ranks):
            if not first:
                first.append(real(model, ranks))
            return first[0]

        greencore.train.wrap = wrap_once
    try:
        report = train(_spec(Path(root), out, **hp))
        if rank == 0:
            (Path(root) / f"{out}.json").write_text(json.dumps(report.as_dict()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _ranks(root: Path, out: str, sticky: bool = False, **hp) -> dict:
    mp.spawn(_rank, args=(free_port(), str(root), out, hp, sticky), nprocs=WORLD, join=True)
    return json.loads((root / f"{out}.json").read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ranks")
    model_folder("llama", root / "llama")
    write_jsonl(root / "train.jsonl", dataset("messages", 48, seed=0, long_every=8))
    write_jsonl(root / "valid.jsonl", dataset("messages", 9, seed=1))
    return root


@pytest.fixture(scope="module")
def one(root: Path) -> dict:
    """The run on one process."""
    return train(_spec(root, "one")).as_dict()


def _weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_two_ranks_equal_one_process(root: Path, one: dict) -> None:
    two = _ranks(root, "two")
    selections = [e["selected_tensors"] for e in one["epochs"]]
    assert [e["selected_tensors"] for e in two["epochs"]] == selections
    assert len({tuple(s) for s in selections}) > 1  # the selection changes: DDP had to be wrapped anew
    base = _weights(str(root / "llama"))
    a, b = _weights(one["final_checkpoint_dir"]), _weights(two["final_checkpoint_dir"])
    trained = {n for s in selections for n in s}
    for name in base:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)
        if name not in trained:
            assert torch.equal(b[name], base[name]), name
    sizes = {n: t.numel() for n, t in base.items()}
    for e1, e2 in zip(one["epochs"], two["epochs"], strict=True):
        assert e2["flops"] == e1["flops"] and e2["rho_achieved"] == e1["rho_achieved"]
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-5)
        assert e2["valid_loss"] == pytest.approx(e1["valid_loss"], rel=1e-5)
        assert e2["world_size"] == WORLD and e1["world_size"] == 1 and e1["communication_bytes"] == 0
        # Every step moves the selected tensors' float32 gradients once: all-reduced by DDP, or (the first
        # step, which the importance pass computed on rank 0) broadcast.
        selected = sum(sizes[n] for n in e2["selected_tensors"])
        assert e2["communication_bytes"] == 4 * selected * e2["steps"]
        assert e2["communication_bytes_full"] == 4 * sum(sizes.values()) * e2["steps"]


def test_one_wrapper_for_a_changing_selection_fails(root: Path, one: dict) -> None:
    # Without a new DDP wrapper per selection a frozen tensor's missing gradient breaks the next step, or an
    # unfrozen one trains unsynchronised: the run fails, or ends away from one process's result.
    try:
        two = _ranks(root, "sticky", sticky=True)
    except mp.ProcessRaisedException as exc:  # a tensor frozen after wrapping: DDP's reducer waits for it
        assert "finished reduction" in str(exc)
        return
    a, b = _weights(one["final_checkpoint_dir"]), _weights(two["final_checkpoint_dir"])
    assert any(not torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-5) for n in a)


def test_fsdp_ranks_equal_one_process(root: Path, one: dict) -> None:
    """FSDP2 on two ranks, each layer sharded once: the selection changes between epochs through
    requires_grad alone, and the run ends where one process ends; its checkpoint is one process's."""
    from transformers import AutoModelForCausalLM

    from greencore.checkpoint import load_state

    two = _ranks(root, "fsdp", distributed="fsdp")
    selections = [e["selected_tensors"] for e in one["epochs"]]
    assert [e["selected_tensors"] for e in two["epochs"]] == selections
    assert len({tuple(s) for s in selections}) > 1
    base = _weights(str(root / "llama"))
    a, b = _weights(one["final_checkpoint_dir"]), _weights(two["final_checkpoint_dir"])
    assert b.keys() == a.keys()
    trained = {n for s in selections for n in s}
    for name in base:
        assert b[name].dtype == a[name].dtype
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)
        if name not in trained:
            assert torch.equal(b[name], base[name]), name
    every = 4 * sum(t.numel() for t in base.values())  # bytes of every tensor (float32)
    for e1, e2 in zip(one["epochs"], two["epochs"], strict=True):
        assert e2["flops"] == e1["flops"] and e2["rho_achieved"] == e1["rho_achieved"]
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-5)
        assert e2["valid_loss"] == pytest.approx(e1["valid_loss"], rel=1e-5)
        assert e2["world_size"] == WORLD
        # Every step gathers every tensor in its forward; only the selected ones are reduce-scattered.
        assert every * e2["steps"] < e2["communication_bytes"] < e2["communication_bytes_full"]
    # The folder loads as any Hugging Face model, and the training state is one process's, AdamW's moments
    # gathered whole.
    loaded = AutoModelForCausalLM.from_pretrained(two["final_checkpoint_dir"]).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(one["final_checkpoint_dir"]).state_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=1e-5, atol=1e-5)
    sa, sb = load_state(one["final_checkpoint_dir"]), load_state(two["final_checkpoint_dir"])
    assert sb["optimizer"]["param_groups"] == sa["optimizer"]["param_groups"]
    assert sb["optimizer"]["state"].keys() == sa["optimizer"]["state"].keys()
    for i, state in sa["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(sb["optimizer"]["state"][i][key], value, rtol=1e-4, atol=1e-7)
    assert sb["trained"] == sa["trained"] and sb["selection"] == sa["selection"]
