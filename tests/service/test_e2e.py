"""End to end, with real processes: ``make run`` on the embedded default (API + its Celery worker, driven by
the ``greentrainer`` CLI), and production's processes on PostgreSQL and Redis (``greentrainer migrate``,
``serve --no-worker``, ``worker``, driven over HTTP). Each trains a green job on the demo model to
``succeeded`` and loads the downloaded checkpoint with transformers."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from api.client import Client
from tests.backends import (
    REDIS_URL,
    create_pg_database,
    delete_redis_prefix,
    drop_pg_database,
    new_redis_prefix,
)
from tests.processes import clean_env, free_port, process, wait_healthy
from tests.service.service_calls import DEMO, SMALL_EXAMPLES, SMALL_HP, SMALL_RHO, dataset_lines, job_body

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 240


def wait_job(client: Client, job_id: str, log: Path) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['status']}:\n{log.read_text()[-3000:]}")


def check_trained(client: Client, job_id: str, models_dir: Path, download_dir: Path) -> None:
    """A finished green job: budget kept every epoch, selection recorded, energy present, and the final
    checkpoint loads with transformers, untrained tensors identical to the base."""
    job = client.get_job(job_id)
    assert job["status"] == "succeeded", job
    assert job["fine_tuned_model"] == f"ft:{DEMO}::{job_id}", job
    epochs = client.epochs(job_id)["data"]
    assert [e["epoch"] for e in epochs] == list(range(1, SMALL_HP["n_epochs"] + 1))
    trained: set[str] = set()
    for e in epochs:
        assert e["flops"]["total"] <= job["rho"] * e["flops"]["full"]
        assert e["selected_tensors"] and e["energy_j"] > 0 and e["gco2e"] > 0 and e["energy_method"]
        trained |= set(e["selected_tensors"])
    checkpoints = {c["name"]: c for c in client.all_checkpoints(job_id)}
    assert {"epoch-1", f"epoch-{SMALL_HP['n_epochs']}", "final"} <= set(checkpoints)
    folder = client.download_checkpoint(job_id, checkpoints["final"]["id"], download_dir)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**tokenizer("What is 2 plus 2?", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    base = load_file(models_dir / DEMO / "model.safetensors")
    tuned = load_file(folder / "model.safetensors")
    assert set(base) == set(tuned)
    untouched = [n for n in base if n not in trained]
    assert untouched and all(torch.equal(base[n], tuned[n]) for n in untouched)
    assert any(not torch.equal(base[n], tuned[n]) for n in trained if n in base)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "greentrainer"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )


def test_make_run_serves_the_demo_model_and_trains_a_job(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = clean_env(GT_DATA_DIR=str(data), GT_PORT=str(port))
    log = tmp_path / "make-run.log"
    url = f"http://127.0.0.1:{port}"
    # `-o` keeps make from reinstalling the venv; the recipe is the Makefile's own `run`.
    with process(["make", "-s", "-o", ".venv/.installed", "run"], env, log) as proc:
        wait_healthy(url, proc, log)
        lines = log.read_text().splitlines()
        assert any(url in line for line in lines)
        key = next(line for line in lines if line.startswith("API key")).split()[-1]
        client = Client(url, key)
        assert [m["id"] for m in client.list_models()["data"]] == [DEMO]  # created on first run

        cli_env = clean_env(GT_API_URL=url, GT_API_KEY=key)
        dataset = tmp_path / "train.jsonl"
        dataset.write_text(dataset_lines(SMALL_EXAMPLES))
        uploaded = run_cli("files", "upload", str(dataset), env=cli_env)
        assert uploaded.returncode == 0, uploaded.stderr
        file_id = uploaded.stdout.split()[-1]
        created = run_cli(
            "jobs",
            "create",
            "--model",
            DEMO,
            "--training-file",
            file_id,
            "--rho",
            str(SMALL_RHO),
            "--n-epochs",
            str(SMALL_HP["n_epochs"]),
            "--batch-size",
            str(SMALL_HP["batch_size"]),
            "--max-seq-len",
            str(SMALL_HP["max_seq_len"]),
            "--learning-rate",
            str(SMALL_HP["learning_rate"]),
            "--wait",
            env=cli_env,
        )
        assert created.returncode == 0, created.stderr + log.read_text()[-3000:]
        job_id = created.stdout.split()[-1]
        for needle in ("epoch 2/2", "ETA", "FLOPs saved", "succeeded"):
            assert needle in created.stderr, created.stderr
        assert "train_loss" in created.stdout  # the per-epoch table
        check_trained(client, job_id, data / "models", tmp_path / "download")

        got = run_cli("jobs", "get", job_id, env=cli_env)
        assert got.returncode == 0 and "succeeded" in got.stdout and "rho_min" in got.stdout
        downloaded = run_cli("jobs", "download", job_id, "--output", str(tmp_path / "cli"), env=cli_env)
        assert downloaded.returncode == 0, downloaded.stderr
        assert (tmp_path / "cli" / f"{job_id}-final" / "model.safetensors").is_file()


def test_production_processes_on_postgres_and_redis(tmp_path: Path, models_dir: Path) -> None:
    database = create_pg_database()
    prefix = new_redis_prefix()
    key = "gt-" + secrets.token_urlsafe(32)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_env(
        GT_DATABASE_URL=database,
        GT_BROKER_URL=REDIS_URL,
        GT_BROKER_PREFIX=prefix,
        GT_DATA_DIR=str(tmp_path / "data"),
        GT_MODELS_DIR=str(models_dir),
        GT_BOOTSTRAP_API_KEY=key,
    )
    try:
        migrated = run_cli("migrate", env=env)
        assert migrated.returncode == 0, migrated.stderr
        with (
            process(
                [str(BIN / "greentrainer"), "serve", "--no-worker", "--port", str(port)],
                env,
                tmp_path / "api.log",
            ) as api,
            process([str(BIN / "greentrainer"), "worker"], env, tmp_path / "worker.log"),
        ):
            wait_healthy(url, api, tmp_path / "api.log")
            client = Client(url, key)
            dataset = tmp_path / "train.jsonl"
            dataset.write_text(dataset_lines(SMALL_EXAMPLES))
            file_id = client.upload_file(dataset)["id"]
            job = client.create_job(job_body(file_id, rho=SMALL_RHO))
            assert job["method"]["type"] == "green" and job["status"] == "queued", job
            done = wait_job(client, job["id"], tmp_path / "worker.log")
            assert done["status"] == "succeeded", (done, (tmp_path / "worker.log").read_text()[-3000:])
            check_trained(client, job["id"], models_dir, tmp_path / "download")
    finally:
        drop_pg_database(database)
        delete_redis_prefix(prefix)
