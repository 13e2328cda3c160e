"""bench/gpu_step.py end to end on the CPU (its dry run): the table it writes for the GPU benchmark."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_step_dry_run_writes_the_table(tmp_path):
    out = tmp_path / "gpu.md"
    cmd = [sys.executable, "bench/gpu_step.py", "--device", "cpu", "--small", "--steps", "1", "--warmup", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    lines = out.read_text().splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith(("| fp32 |", "| bf16"))]
    assert [(r[0].strip("| "), r[1]) for r in rows] == [
        (p, m) for p in ("fp32", "bf16-mixed", "bf16") for m in ("full", "green-0.5")
    ]
    for row in rows:
        assert row[5] == "+0"  # predicted step FLOPs are exactly FlopCounterMode's
        assert row[-1].strip("| ") in {"rapl", "estimate"}  # labelled with its method; no NVML on a CPU
        assert abs(float(row[12].rstrip("%"))) < 10  # the memory estimate within 10% of the live storages
    green = [r for r in rows if r[1] == "green-0.5"]
    assert all(float(r[9]) > 0 for r in green)  # green/full time per precision
    assert int(green[0][2]) < int(rows[0][2])  # green trains fewer tensors than full


def test_gpu_distributed_dry_run_writes_the_table(tmp_path):
    """bench/gpu_distributed.sh as a GPU machine runs it, on 2 gloo CPU processes and a tiny model: the table
    of full and green-0.5 bytes and step times, each equal to one process."""
    env = {**os.environ, "DEVICE": "cpu", "NPROC": "2", "OUT": str(tmp_path), "GT_DIST_TIMEOUT_S": "60"}
    done = subprocess.run(
        ["bash", "bench/gpu_distributed.sh", "--small", "--engines", "ddp"],  # fsdp: test_distributed.py
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    text = (tmp_path / "gpu-distributed.md").read_text()
    assert text.startswith("# Distributed green: 2 ranks (gloo, CPU), DDP, against one process")
    rows = [line.strip("| ").split(" | ")[1:] for line in text.splitlines() if line.startswith("| ddp |")]
    assert [r[0] for r in rows] == ["full", "green-0.5"]
    full, green = rows
    assert float(full[4]) == 1.0 and float(green[4]) <= 0.5  # green all-reduces at most half of full's bytes
    for row in rows:
        assert int(row[3].replace(",", "")) > 0 and float(row[6]) > 0  # bytes and step ms on 2 ranks
        assert row[9] == "yes" and float(row[10]) < 1e-5  # the ranks chose and ended as one process
    assert (tmp_path / "gpu-distributed.log").is_file()
