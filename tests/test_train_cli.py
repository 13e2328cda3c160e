"""``greentrainer train --config``: a run from a YAML or JSON config on a tiny model, its checkpoints and
``epochs.jsonl``, an interrupted run resumed with ``--resume``, and configs refused with exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from api.cli import build_parser, main
from api.cli_train import EpochRecords, run_train
from greencore.checkpoint import load_state
from greencore.spec import EpochReport
from tests.model_folders import dataset, model_folder, write_jsonl
from tests.processes import ROOT, free_port

pytestmark = pytest.mark.usefixtures("one_thread")

HP = {
    "n_epochs": 2,
    "batch_size": 4,
    "learning_rate": 1e-3,
    "max_seq_len": 64,
    "rho": 0.75,
    "warmup_steps": 2,
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder holding the demo model (``models/demo-tiny``), ``train.jsonl`` and ``valid.jsonl``."""
    root = tmp_path_factory.mktemp("train-cli")
    model_folder("llama", root / "models" / "demo-tiny")
    write_jsonl(root / "train.jsonl", dataset("prompt_completion", 24))
    write_jsonl(root / "valid.jsonl", dataset("prompt_completion", 6, seed=1))
    return root


def config(inputs: Path, name: str, **changes) -> Path:
    """A config file beside the inputs (relative paths), the run's settings changed by ``changes``."""
    settings = {
        "model_dir": "models/demo-tiny",
        "train_file": "train.jsonl",
        "valid_file": "valid.jsonl",
        "output_dir": f"runs/{Path(name).stem}",
        "method": "green",
        "seed": 3,
        "hyperparameters": dict(HP),
        "device": "cpu",
    }
    settings.update(changes)
    path = inputs / name
    if path.suffix == ".json":
        path.write_text(json.dumps(settings))
    else:
        import yaml

        path.write_text(yaml.safe_dump(settings))
    return path


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "epochs.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def comparable(record: dict) -> dict:
    """A record without what depends on time, energy readings or paths."""
    drop = ("wall_s", "valid_wall_s", "energy_j", "gco2e", "energy_inputs", "checkpoint_dir")
    return {k: v for k, v in record.items() if k not in drop}


@pytest.fixture(scope="module")
def whole(inputs) -> Path:
    """The output folder of an uninterrupted run from a JSON config."""
    assert main(["train", "--config", str(config(inputs, "whole.json"))]) == 0
    return inputs / "runs" / "whole"


def test_json_config_writes_checkpoints_and_epoch_records(whole):
    assert sorted(p.name for p in whole.iterdir()) == ["epoch-1", "epoch-2", "epochs.jsonl", "final"]
    # The report the run returns is what its last checkpoint holds (TrainReport.epochs).
    returned = load_state(whole / "final")["reports"]
    assert records(whole) == returned
    assert [r["epoch"] for r in returned] == [1, 2]
    assert returned[1]["checkpoint_dir"] == str(whole / "epoch-2")
    assert same_weights(whole / "final", whole / "epoch-2")


def test_yaml_config_runs_the_same_spec(inputs, whole, capsys):
    # YAML's own spelling of numbers: 1e-3 (no dot) is a string to PyYAML, taken as a number.
    path = config(inputs, "same.yaml")
    path.write_text(path.read_text().replace("learning_rate: 0.001", "learning_rate: 1e-3"))
    assert "1e-3" in path.read_text()
    assert main(["train", "--config", str(path)]) == 0
    out = inputs / "runs" / "same"
    assert same_weights(out / "final", whole / "final")
    assert [comparable(r) for r in records(out)] == [comparable(r) for r in records(whole)]
    err = capsys.readouterr().err
    for epoch in (1, 2):
        line = next(x for x in err.splitlines() if x.startswith(f"epoch {epoch}/2  train_loss"))
        for label in ("valid_loss", "accuracy", "rho_achieved", "flops", "wall_s", "energy_j"):
            assert label in line


def test_interrupted_run_resumes_to_the_uninterrupted_one(inputs, whole, capsys):
    path = config(inputs, "part.json")
    out = inputs / "runs" / "part"
    asked = []

    def stop_in_epoch_2() -> bool:  # asked at epoch 2's start, then before each step: stops at its 2nd step
        if (out / "epoch-1").is_dir():
            asked.append(1)
        return len(asked) >= 3

    args = build_parser().parse_args(["train", "--config", str(path)])
    assert run_train(args, should_stop=stop_in_epoch_2) == 130
    assert "go on with --resume" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["epoch-1", "epochs.jsonl"]
    assert [r["epoch"] for r in records(out)] == [1]
    # Without --resume the run is refused: it would write over this one's checkpoints.
    assert main(["train", "--config", str(path)]) == 2
    assert "already holds checkpoints (epoch-1)" in capsys.readouterr().err
    # A line written past the checkpoint (an interrupted append) is not kept twice.
    with open(out / "epochs.jsonl", "a") as handle:
        handle.write((out / "epochs.jsonl").read_text())

    assert main(["train", "--config", str(path), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().err
    assert same_weights(out / "final", whole / "final")
    assert same_weights(out / "epoch-1", whole / "epoch-1")
    assert [r["epoch"] for r in records(out)] == [1, 2]
    assert [comparable(r) for r in records(out)] == [comparable(r) for r in records(whole)]
    assert records(out) == load_state(out / "final")["reports"]


def test_a_resumed_runs_first_epoch_keeps_one_line_per_earlier_epoch(whole, tmp_path):
    first, second = records(whole)
    path = tmp_path / "epochs.jsonl"
    # What an interrupted run may leave: epoch 1 twice, epoch 2 past the checkpoint resumed from, a cut line.
    stale = {**first, "train_loss": 99.0}
    path.write_text("".join(json.dumps(r) + "\n" for r in (stale, first, second)) + '{"epoch": 3, "fl')
    epochs = EpochRecords(path)
    epochs.add(EpochReport(**second))  # the resumed run's first epoch
    assert records(tmp_path) == [first, second]
    third = {**second, "epoch": 3}
    epochs.add(EpochReport(**third))
    assert records(tmp_path) == [first, second, third]
    epochs.finish([EpochReport(**first), EpochReport(**second)])
    assert records(tmp_path) == [first, second]


def test_output_dir_override_and_resume_without_a_checkpoint(inputs, tmp_path, capsys):
    path = config(inputs, "override.json", hyperparameters={**HP, "n_epochs": 1})
    out = tmp_path / "elsewhere"
    assert main(["train", "--config", str(path), "--output-dir", str(out), "--resume"]) == 0
    assert "starting from epoch 1" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["epoch-1", "epochs.jsonl", "final"]
    assert not (inputs / "runs" / "override").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"modle_dir": "x"}, "modle_dir: unknown key (did you mean model_dir?)"),
        ({"hyperparameters": {"lr": 0.1}}, "hyperparameters.lr: unknown key"),
        ({"energy": {"watt": 10}}, "energy.watt: unknown key (did you mean watts?)"),
        ({"hyperparameters": {"n_epochs": 0}}, "n_epochs: must be at least 1"),
        ({"hyperparameters": {"batch_size": "eight"}}, "hyperparameters.batch_size: must be an integer"),
        ({"hyperparameters": {"rho": 0.5, "max_flops": 1e12}}, "give one budget, not rho and max_flops"),
        ({"hyperparameters": {"precision": "fp8"}}, "precision: must be one of fp32, bf16-mixed, bf16"),
        ({"hyperparameters": {"distributed": "zero3"}}, "distributed: must be one of ddp, fsdp"),
        (
            {"hyperparameters": {"distributed": "fsdp", "precision": "bf16"}},
            "distributed: fsdp does not run precision bf16",
        ),
        ({"method": "greenest"}, "method: "),
        ({"train_file": "missing.jsonl"}, "train_file: no such file"),
        ({"model_dir": "models"}, "has no config.json"),
        ({"device": "tpu9"}, "device: 'tpu9' is not a device"),
        ({"hyperparameters": {**HP, "rho": 0.05}}, "below rho_min"),
    ],
)
def test_a_config_that_cannot_run_exits_2_with_its_message(inputs, capsys, changes, message):
    path = config(inputs, "bad.yaml", **changes)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not (inputs / "runs" / "bad" / "epoch-1").exists()


def test_a_bad_dataset_line_or_config_file_exits_2(inputs, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n')
    path = config(inputs, "badline.json", train_file=str(tmp_path / "bad.jsonl"))
    assert main(["train", "--config", str(path)]) == 2
    assert "error: line 1" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "error: config: cannot read" in capsys.readouterr().err
    (tmp_path / "run.toml").write_text("")
    assert main(["train", "--config", str(tmp_path / "run.toml")]) == 2
    assert "give a .json, .yaml or .yml file" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1]")
    assert main(["train", "--config", str(tmp_path / "list.json")]) == 2
    assert "must hold a mapping" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nproc", "0"], "--nproc must be at least 1"),
        (["--nnodes", "2"], "--nnodes > 1 needs --rdzv-endpoint"),
    ],
)
def test_bad_rank_flags_exit_2(inputs, capsys, flags, message):
    assert main(["train", "--config", str(config(inputs, "ranks.json")), *flags]) == 2
    assert message in capsys.readouterr().err


def test_two_machines_through_torchrun_equal_one_process(inputs, tmp_path):
    """Two machines of one rank each (`--nnodes 2 --node-rank i --rdzv-endpoint`: torchrun's static
    rendezvous, here both on this host, gloo over loopback) end where one process ends: the same selections
    and records, weights within float rounding; one epochs.jsonl, written by rank 0 into the shared output
    folder. (`--nproc 2` on one machine, torchrun's --standalone: the fsdp test below, a worker's ranks.)"""
    one, two = tmp_path / "one", tmp_path / "two"
    path = config(inputs, "two-ranks.json")
    assert main(["train", "--config", str(path), "--output-dir", str(one)]) == 0
    command = [sys.executable, "-m", "api.cli", "train", "--config", str(path), "--output-dir", str(two)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GT_DIST_TIMEOUT_S": "120", "GLOO_SOCKET_IFNAME": "lo"}
    endpoint = f"127.0.0.1:{free_port()}"
    machines = [
        subprocess.Popen(
            [*command, "--nproc", "1", "--nnodes", "2", "--node-rank", str(i), "--rdzv-endpoint", endpoint],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    outputs = [m.communicate(timeout=300) for m in machines]
    for m, (_out, err) in zip(machines, outputs, strict=True):
        assert m.returncode == 0, err[-3000:]
    assert outputs[0][0].count("final checkpoint:") == 1 and "final checkpoint:" not in outputs[1][0]
    a, b = records(one), records(two)
    assert [r["selected_tensors"] for r in b] == [r["selected_tensors"] for r in a]
    assert [r["flops"] for r in b] == [r["flops"] for r in a]
    assert [r["world_size"] for r in b] == [2, 2] and all(r["communication_bytes"] > 0 for r in b)
    wa, wb = weights(one / "final"), weights(two / "final")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-5, atol=1e-5), name


def test_fsdp_ranks_through_torchrun_resume_one_process_and_end_where_it_ends(inputs, tmp_path):
    """`greentrainer train --nproc 2 --resume` with `distributed: fsdp` (FSDP2 on gloo) goes on from a
    checkpoint one process wrote (checkpoints hold full tensors, whatever wrote them;
    tests/test_distributed.py checks that a sharded run writes one process's) and ends where one process
    ends; full fine-tuning's measured bytes are exactly what the record says full fine-tuning exchanges. One
    torchrun run: the ranks' start-up is most of this test's time."""
    import shutil

    hp = {k: v for k, v in HP.items() if k != "rho"} | {"distributed": "fsdp"}
    path = config(inputs, "fsdp.json", method="full", hyperparameters=hp)
    one, cut = tmp_path / "one", tmp_path / "cut"
    assert main(["train", "--config", str(path), "--output-dir", str(one)]) == 0  # one process: no shards
    # Cut after epoch 1, as a killed run leaves it, and resumed on two sharded ranks.
    shutil.copytree(one, cut)
    shutil.rmtree(cut / "epoch-2")
    shutil.rmtree(cut / "final")
    (cut / "epochs.jsonl").write_text((one / "epochs.jsonl").read_text().splitlines(keepends=True)[0])
    command = [sys.executable, "-m", "api.cli", "train", "--config", str(path), "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GT_DIST_TIMEOUT_S": "120"}
    done = subprocess.run(
        [*command, "--output-dir", str(cut), "--resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final checkpoint:") == 1  # rank 0 reports
    a, b = records(one), records(cut)
    assert [r["epoch"] for r in b] == [1, 2] and b[0] == a[0]
    assert b[1]["flops"] == a[1]["flops"] and b[1]["world_size"] == 2
    assert 0 < b[1]["communication_bytes"] == b[1]["communication_bytes_full"]
    assert b[1]["train_loss"] == pytest.approx(a[1]["train_loss"], rel=1e-5)
    wa, wb = weights(one / "final"), weights(cut / "final")
    assert wb.keys() == wa.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-5, atol=1e-5), name


def test_ctrl_c_stops_before_the_next_step_and_resume_finishes(inputs, tmp_path):
    """The real command in its own process: SIGINT once epoch 1 is checkpointed stops it (exit 130) with
    every checkpointed epoch, and only those, in epochs.jsonl; --resume finishes the run."""
    write_jsonl(tmp_path / "long.jsonl", dataset("prompt_completion", 96))
    out = tmp_path / "out"
    hp = {**HP, "n_epochs": 2}
    path = config(inputs, "interrupted.json", train_file=str(tmp_path / "long.jsonl"), hyperparameters=hp)
    command = [sys.executable, "-m", "api.cli", "train", "--config", str(path), "--output-dir", str(out)]
    with (tmp_path / "log").open("wb") as log:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model on a shared machine: one thread is faster
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not (out / "epoch-1").is_dir() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 130, (tmp_path / "log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "go on with --resume" in (tmp_path / "log").read_text()
    done = sorted(int(p.name.removeprefix("epoch-")) for p in out.glob("epoch-*"))
    assert done == [1] and not (out / "final").exists()
    assert [r["epoch"] for r in records(out)] == done
    assert main(["train", "--config", str(path), "--output-dir", str(out), "--resume"]) == 0
    assert [r["epoch"] for r in records(out)] == [1, 2]
    assert records(out) == load_state(out / "final")["reports"]


def test_the_docs_example_config_runs(inputs, tmp_path):
    """docs/train.md's run.yaml, as written, beside the demo model and a train.jsonl."""
    text = (ROOT / "docs" / "train.md").read_text()
    example = text.split("cat > run.yaml <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    (inputs / "run.yaml").write_text(example)
    assert main(["train", "--config", str(inputs / "run.yaml"), "--output-dir", str(tmp_path / "o")]) == 0
    assert [r["epoch"] for r in records(tmp_path / "o")] == [1, 2]


def test_a_rank_killed_mid_run_resumes_from_the_last_epoch(inputs, tmp_path):
    """One rank SIGKILLed once epoch 1 is checkpointed: torchrun ends the run (non-zero), epoch 1 and its one
    record stay; `--resume --nproc 2` finishes it with one record per epoch, equal to an unbroken run's."""
    import psutil

    write_jsonl(tmp_path / "long.jsonl", dataset("prompt_completion", 96))
    path = config(inputs, "killed.json", train_file=str(tmp_path / "long.jsonl"))
    out, whole = tmp_path / "out", tmp_path / "whole"
    command = [sys.executable, "-m", "api.cli", "train", "--config", str(path), "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GT_DIST_TIMEOUT_S": "60"}
    with (tmp_path / "log").open("wb") as log:
        run = [*command, "--output-dir", str(out)]
        proc = subprocess.Popen(run, cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 180
            while not (out / "epoch-1").is_dir() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            ranks = [
                p
                for p in psutil.Process(proc.pid).children(recursive=True)
                if "torch.distributed.run" not in " ".join(p.cmdline())
            ]
            assert len(ranks) == 2, [p.cmdline() for p in ranks]
            ranks[1].kill()
            assert proc.wait(120) != 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not (out / "final").exists() and [r["epoch"] for r in records(out)] == [1]
    resumed = subprocess.run([*command, "--output-dir", str(out), "--resume"], cwd=ROOT, env=env, timeout=300)
    assert resumed.returncode == 0
    unbroken = subprocess.run([*command, "--output-dir", str(whole)], cwd=ROOT, env=env, timeout=300)
    assert unbroken.returncode == 0
    assert [r["epoch"] for r in records(out)] == [1, 2]
    assert [r["selected_tensors"] for r in records(out)] == [r["selected_tensors"] for r in records(whole)]
    assert same_weights(out / "final", whole / "final")
