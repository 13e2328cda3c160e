"""Checkpoint archives never follow symbolic links (api/archive.py): a link in a checkpoint folder, to a file
or a folder outside it, is left out of the tar, and what it points to is never read."""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import pytest

from api.archive import ArchiveChanged, folder_bytes, plan_tar

SECRET = b"the operator's secret: 7f3c9a0e-not-for-users"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the checkpoint, holding a secret file."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_bytes(SECRET)
    (folder / "nested").mkdir()
    (folder / "nested" / "more-secret.bin").write_bytes(SECRET * 100)
    return folder


@pytest.fixture
def checkpoint(tmp_path: Path, outside: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(1500))
    (folder / "secret.txt").symlink_to(outside / "secret.txt")  # a link to a file outside
    (folder / "leak").symlink_to(outside)  # a link to a folder outside
    (folder / "sub").mkdir()
    (folder / "sub" / "hostname").symlink_to("/etc/hostname")  # absolute, wherever it points
    (folder / "sub" / "dangling").symlink_to(outside / "not-there")
    return folder


def test_links_are_left_out_and_never_read(checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="api.archive"):
        plan = plan_tar(checkpoint, "root")
    data = b"".join(plan.stream())
    assert len(data) == plan.length  # what Content-Length promised is what is streamed
    assert SECRET not in data
    hostname = Path("/etc/hostname")
    if hostname.is_file() and len(hostname.read_bytes().strip()) >= 8:
        assert hostname.read_bytes().strip() not in data
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["root/model.safetensors"]
        member = tar.extractfile("root/model.safetensors")
        assert member is not None and member.read() == (checkpoint / "model.safetensors").read_bytes()
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in ("secret.txt", "leak", "hostname", "dangling"):
        assert name in warned


def test_a_checkpoints_bytes_do_not_count_links(checkpoint: Path) -> None:
    assert folder_bytes(checkpoint) == 1500


def test_a_folder_that_is_itself_a_link_is_refused(tmp_path: Path, outside: Path) -> None:
    link = tmp_path / "linked-ckpt"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(FileNotFoundError, match="symbolic link"):
        plan_tar(link, "root")


def test_a_file_replaced_by_a_link_after_planning_fails_the_stream(checkpoint: Path, outside: Path) -> None:
    (checkpoint / "config.json").write_text("{}")
    plan = plan_tar(checkpoint, "root")
    weights = checkpoint / "model.safetensors"
    weights.unlink()
    weights.symlink_to(outside / "secret.txt")
    stream = plan.stream()
    sent = b""
    with pytest.raises(ArchiveChanged, match="model.safetensors"):
        for chunk in stream:
            sent += chunk
    assert SECRET not in sent and len(sent) < plan.length
