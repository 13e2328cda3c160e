"""Storage on both backends: uploads and checkpoints are written atomically, a partial file is never served or
resumed from, and a full disk fails a job with `disk_full` and an upload with 507, leaving nothing behind.

Full disks are real: a small tmpfs mounted over the folder that fills up (this needs root or CAP_SYS_ADMIN;
the tests that need one are skipped, saying so, where mounting is not permitted).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from sqlalchemy import func, select, update

from api.archive import ArchiveChanged, plan_tar
from api.config import Settings
from api.datasets import TEMP_PREFIX, store_upload
from api.errors import DatasetInvalid, PayloadTooLarge
from api.ids import new_id
from api.keys import authenticate
from api.tables import Checkpoint, File, Job, utcnow
from greencore import checkpoint
from greencore.methods import ModelExport
from tests.service.service_calls import (
    DEMO,
    JOBS,
    SMALL_EXAMPLES,
    checkpoints,
    create_job,
    dataset_lines,
    post_scope,
    upload,
)
from worker.failures import error_of
from worker.runner import run_job


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's units: 64k, 1m) mounted on ``folder`` for the block; skips the test where
    mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        pytest.skip("no mount command here: cannot make a small volume to fill up")
    if done.returncode != 0:
        pytest.skip(
            f"mounting a tmpfs is not permitted here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True, timeout=30)


def tenant_folder(sessions, settings: Settings, key: str) -> Path:
    """Where the uploads of ``key``'s tenant go."""
    with sessions() as session:
        tenant = authenticate(session, key)
        assert tenant is not None and settings.artifacts_dir is not None
        return settings.artifacts_dir / "files" / tenant.id


def file_rows(sessions, folder: Path) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(File).where(File.tenant_id == folder.name))


# -- uploads -------------------------------------------------------------------------------------------------


def test_an_upload_is_validated_under_a_temporary_name_then_renamed(tmp_path: Path) -> None:
    target = tmp_path / "tenant" / "file-1.jsonl"
    seen: list[Path] = []

    def validate(path: Path) -> str:
        # While it is being checked, the file is complete under another name, and the final name is free.
        assert not target.exists() and path.parent == target.parent and path.name.startswith(TEMP_PREFIX)
        assert path.read_bytes() == b"line\n" * 1000
        seen.append(path)
        return "summary"

    stored = store_upload(io.BytesIO(b"line\n" * 1000), target, 1 << 20, validate)
    assert seen and stored.summary == "summary" and stored.bytes == 5000
    assert target.read_bytes() == b"line\n" * 1000 and os.listdir(target.parent) == [target.name]


class BrokenSource(io.RawIOBase):
    """An upload whose client goes away after ``good`` bytes."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.left <= 0:
            raise ConnectionResetError(errno.ECONNRESET, "the client went away")
        n = min(len(buffer), self.left, 4096)
        buffer[:n] = b"x" * n
        self.left -= n
        return n


def test_a_failed_upload_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "tenant" / "file-1.jsonl"

    def invalid(_path: Path) -> None:
        raise DatasetInvalid("not valid JSON", 3, None)

    with pytest.raises(DatasetInvalid):
        store_upload(io.BytesIO(b"{}\n" * 10), target, 1 << 20, invalid)
    with pytest.raises(PayloadTooLarge):
        store_upload(io.BytesIO(b"x" * 5000), target, 4096)
    with pytest.raises(ConnectionResetError):
        store_upload(io.BufferedReader(BrokenSource(3 << 20)), target, 1 << 30)
    assert os.listdir(target.parent) == []


def test_temporary_files_of_killed_uploads_are_swept(tmp_path: Path) -> None:
    folder = tmp_path / "tenant"
    folder.mkdir()
    stale, fresh = folder / f"{TEMP_PREFIX}killed", folder / f"{TEMP_PREFIX}in-progress"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    two_days_ago = datetime.now(UTC).timestamp() - 2 * 24 * 3600
    os.utime(stale, (two_days_ago, two_days_ago))
    store_upload(io.BytesIO(b"{}\n"), folder / "file-1.jsonl", 1 << 20)
    assert sorted(os.listdir(folder)) == sorted([fresh.name, "file-1.jsonl"])  # another upload's is kept


def test_a_rejected_upload_leaves_neither_file_nor_row(
    client: TestClient, sessions, settings: Settings, key: str
) -> None:
    folder = tenant_folder(sessions, settings, key)
    text = dataset_lines(2) + '{"prompt": "a", "completion": 3}\n'
    response = client.post(
        "/v1/files", files={"file": ("bad.jsonl", text.encode())}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 400 and response.json()["error"]["line"] == 3
    assert not folder.exists() or os.listdir(folder) == []
    assert file_rows(sessions, folder) == 0


def test_a_client_gone_mid_upload_leaves_neither_file_nor_row(
    app, sessions, settings: Settings, key: str
) -> None:
    folder = tenant_folder(sessions, settings, key)
    boundary = "gtboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="train.jsonl"\r\n'
        f"Content-Type: application/jsonl\r\n\r\n{dataset_lines(200)}\r\n--{boundary}--\r\n"
    ).encode()
    half = body[: len(body) // 2]
    messages = [{"type": "http.request", "body": half, "more_body": True}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = post_scope(
        "/v1/files",
        {
            "authorization": f"Bearer {key}",
            "content-type": f"multipart/form-data; boundary={boundary}",
            "content-length": str(len(body)),
        },
    )
    anyio.run(app, scope, receive, send)
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    assert start is None or start["status"] >= 400
    assert not folder.exists() or os.listdir(folder) == []
    assert file_rows(sessions, folder) == 0


def test_an_upload_onto_a_full_disk_answers_507_and_leaves_nothing(
    client: TestClient,
    sessions,
    settings: Settings,
    key: str,
) -> None:
    folder = tenant_folder(sessions, settings, key)
    with tmpfs(folder, "64k"):
        kept = upload(client, dataset_lines(SMALL_EXAMPLES))  # fits
        big = dataset_lines(3000).encode()  # about 200 kB: does not
        response = client.post("/v1/files", files={"file": ("big.jsonl", big)}, data={"purpose": "fine-tune"})
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["code"] == "insufficient_storage" and "no space left" in error["message"]
        assert "nothing was stored" in error["message"]
        assert os.listdir(folder) == [f"{kept['id']}.jsonl"]  # no partial file, no temporary one
        assert file_rows(sessions, folder) == 1
        assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [kept["id"]]
        assert (folder / f"{kept['id']}.jsonl").read_text() == dataset_lines(SMALL_EXAMPLES)


# -- checkpoints ---------------------------------------------------------------------------------------------


def test_a_checkpoint_whose_files_are_gone_answers_404_and_a_partial_one_is_never_served(
    client: TestClient,
    sessions,
    settings: Settings,
) -> None:
    job_id = create_job(client)
    assert settings.artifacts_dir is not None
    output = settings.artifacts_dir / "jobs" / job_id
    partial = output / ".epoch-1.tmp-4242"  # what a worker killed mid-write leaves
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    ckpt_id = new_id("ckpt")
    with sessions() as session:  # the row of epoch-1, whose folder was since removed from storage
        session.add(
            Checkpoint(
                id=ckpt_id,
                job_id=job_id,
                name="epoch-1",
                epoch=1,
                path=f"jobs/{job_id}/epoch-1",
                bytes=100,
                created_at=utcnow(),
            )
        )
        session.commit()
    response = client.get(f"{JOBS}/{job_id}/checkpoints/{ckpt_id}/content")
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert ckpt_id in message and "epoch-1" in message and "no longer in storage" in message
    assert [c["name"] for c in checkpoints(client, job_id)] == ["epoch-1"]


def test_a_write_killed_midway_is_never_resumed_from_and_is_removed_when_the_job_ends(
    client: TestClient,
    sessions,
    settings: Settings,
) -> None:
    job_id = create_job(client, n_epochs=1)
    assert settings.artifacts_dir is not None
    output = settings.artifacts_dir / "jobs" / job_id
    partial = output / "attempt-1" / ".epoch-1.tmp-4242"  # the first attempt died while writing epoch-1
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    with sessions() as session:  # ... and its heartbeat stopped long ago
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status="running",
                worker="lost-host:1",
                attempts=1,
                started_at=utcnow(),
                heartbeat_at=datetime(2000, 1, 1, tzinfo=UTC),
            )
        )
        session.commit()
    assert client.get(f"{JOBS}/{job_id}/checkpoints").json()["data"] == []

    # Resuming from the partial folder would fail (no training state): the job succeeds from the start.
    assert run_job(job_id, sessions, settings) == "succeeded"
    job = client.get(f"{JOBS}/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert sorted(os.listdir(output)) == ["attempt-1", "attempt-2"]  # each attempt writes its own folder
    assert os.listdir(output / "attempt-1") == []  # the leftover is gone
    assert sorted(os.listdir(output / "attempt-2")) == ["epoch-1", "final"]
    for ckpt in checkpoints(client, job_id):
        response = client.get(f"{JOBS}/{job_id}/checkpoints/{ckpt['id']}/content")
        assert response.status_code == 200 and int(response.headers["content-length"]) == len(
            response.content
        )
        with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
            assert f"{job_id}-{ckpt['name']}/model.safetensors" in tar.getnames()


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_leaves_nothing(
    tmp_path: Path, models_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(models_dir / DEMO)
    tokenizer = AutoTokenizer.from_pretrained(models_dir / DEMO)
    dtypes = checkpoint.base_dtypes(models_dir / DEMO)
    model = ModelExport(model, model.state_dict())  # what full fine-tuning's checkpoint holds
    with tmpfs(tmp_path / "out", "1m") as out:
        folder = checkpoint.epoch_dir(out, 1)
        checkpoint.save_checkpoint(folder, model, tokenizer, dtypes, torch.float32, {"epoch": 1})
        # A rewrite of epoch-1 whose training state does not fit: the model does, torch.save of the state
        # fails.
        with pytest.raises(checkpoint.CheckpointWriteError) as failure:
            checkpoint.save_checkpoint(
                folder, model, tokenizer, dtypes, torch.float32, {"epoch": 2, "big": torch.zeros(1 << 20)}
            )
        assert failure.value.folder == folder
        assert any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain(failure.value))
        assert os.listdir(out) == ["epoch-1"]  # no temporary folder left
        assert checkpoint.load_state(folder) == {"epoch": 1}  # the previous checkpoint, whole

        code, message = error_of(failure.value)
        assert code == "disk_full" and "no space left" in message and str(folder) in message


def chain(exc: BaseException) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def test_leftovers_of_a_killed_write_are_removed_by_the_next_save(tmp_path: Path) -> None:
    source = tmp_path / "epoch-1"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"weights")
    for leftover in (".epoch-2.tmp-4242", ".final.old-4242"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"half")
    final = checkpoint.link_final(tmp_path, source)
    assert sorted(os.listdir(tmp_path)) == ["epoch-1", "final"]
    assert (final / "model.safetensors").read_bytes() == b"weights"


# -- archives: Content-Length is promised up front, so a file that changes must break the download -----------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"a": 1}))
    (folder / "model.safetensors").write_bytes(os.urandom(3000))
    return folder


def test_an_archive_is_exactly_as_long_as_planned(folder: Path) -> None:
    plan = plan_tar(folder, "root")
    data = b"".join(plan.stream())
    assert len(data) == plan.length
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["root/config.json", "root/model.safetensors"]
        member = tar.extractfile("root/model.safetensors")
        assert member is not None and member.read() == (folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize("change", ["removed", "replaced", "truncated"])
def test_a_file_changed_while_an_archive_streams_fails_the_stream(folder: Path, change: str) -> None:
    plan = plan_tar(folder, "root")
    stream = plan.stream()
    first = next(stream)  # config.json's header is on its way
    weights = folder / "model.safetensors"
    if change == "removed":
        weights.unlink()
    elif change == "replaced":  # same size, another file (a rewritten checkpoint)
        (folder / "new").write_bytes(os.urandom(3000))
        os.replace(folder / "new", weights)
    else:
        os.truncate(weights, 1000)
    with pytest.raises(ArchiveChanged, match="model.safetensors"):
        sent = len(first) + sum(len(chunk) for chunk in stream)
        assert sent == plan.length  # not reached: the stream must not end as a shorter, valid-looking archive


def test_planning_a_missing_folder_fails_rather_than_archiving_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        plan_tar(tmp_path / "gone", "root")


# -- a full disk during a job --------------------------------------------------------------------------------


def test_a_job_whose_disk_fills_up_fails_with_disk_full(
    client: TestClient, sessions, settings: Settings
) -> None:
    job_id = create_job(client)
    assert settings.artifacts_dir is not None
    output = settings.artifacts_dir / "jobs" / job_id
    with tmpfs(output, "128k"):  # the configs fit, the model's safetensors (about 380 kB) do not
        assert run_job(job_id, sessions, settings) == "failed"
        assert os.listdir(output) == ["attempt-1"]
        assert os.listdir(output / "attempt-1") == []  # the half-written checkpoint was removed
    shutil.rmtree(output, ignore_errors=True)
    job = client.get(f"{JOBS}/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "disk_full"
    message = job["error"]["message"]
    # It names the checkpoint relative to the artifacts: the server's folders are not the user's business.
    assert "no space left" in message and f"jobs/{job_id}/attempt-1/epoch-1" in message
    assert str(settings.artifacts_dir) not in message
    assert client.get(f"{JOBS}/{job_id}/checkpoints").json()["data"] == []
    assert client.get(f"{JOBS}/{job_id}/epochs").json()["data"] == []


def test_library_errors_that_wrap_a_full_disk_are_disk_full(tmp_path: Path) -> None:
    def torch_save(path: Path) -> None:
        with open(path, "wb") as handle:  # as greencore.checkpoint saves the training state
            torch.save({"x": torch.zeros(1 << 16)}, handle)

    with tmpfs(tmp_path / "full", "64k") as full:
        failures = []
        for write in (
            lambda: save_file({"x": torch.zeros(1 << 16)}, str(full / "a.safetensors")),  # SafetensorError
            lambda: torch_save(full / "b.pt"),  # RuntimeError, the OSError in its context
            lambda: (full / "c.json").write_text("x" * (1 << 17)),  # OSError
        ):
            with pytest.raises(Exception) as caught:  # each library has its own type
                write()
            failures.append(caught.value)
    assert {type(f).__name__ for f in failures} == {"SafetensorError", "RuntimeError", "OSError"}
    for failure in failures:
        assert error_of(failure)[0] == "disk_full", repr(failure)
        assert "no space left" in error_of(failure)[1]
    assert error_of(RuntimeError("CUDA error: an illegal memory access"))[0] == "training_error"
