"""Uploads that died on both backends: an upload is renamed into place before its row commits, so a process
killed in between leaves a file that no row names; the sweep (api.datasets.sweep_uploads, run by every
recovery) deletes such files once they are older than the grace period, and temporary files of uploads killed
mid-write, and keeps everything else."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.config import Settings
from api.datasets import ORPHAN_GRACE_S, STALE_TEMP_S, TEMP_PREFIX, sweep_uploads
from api.keys import authenticate
from api.recovery import recover
from api.tables import File
from tests.service.service_calls import dataset_lines, new_key, upload

# A process that uploads a dataset and dies after the file is renamed into place, before its row commits.
DIES_BEFORE_COMMIT = """
import os, sys
from fastapi.testclient import TestClient
import api.routes.files
from api.app import create_app

api.routes.files._commit_upload = lambda *args: os._exit(3)
client = TestClient(create_app(), headers={"Authorization": f"Bearer {sys.argv[1]}"})
client.post("/v1/files", files={"file": ("t.jsonl", sys.argv[2].encode())})
os._exit(0)
"""


def own_artifacts(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"artifacts_dir": tmp_path / "artifacts"})


def tenant_folder(sessions, settings: Settings, key: str) -> Path:
    with sessions() as session:
        tenant = authenticate(session, key)
        assert tenant is not None
        return settings.artifacts_dir / "files" / tenant.id


def age(path: Path, seconds: float) -> None:
    """Make ``path`` look ``seconds`` old."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_the_sweep_deletes_old_files_no_row_names_and_keeps_the_rest(
    settings: Settings, sessions, tmp_path: Path
) -> None:
    mine = own_artifacts(settings, tmp_path)
    key = new_key(sessions)
    client = TestClient(create_app(mine), headers={"Authorization": f"Bearer {key}"})
    kept = upload(client, dataset_lines(3))
    deleted = upload(client, dataset_lines(3))
    assert client.delete(f"/v1/files/{deleted['id']}").status_code == 200
    folder = tenant_folder(sessions, mine, key)
    referenced = folder / f"{kept['id']}.jsonl"
    old_orphan, young_orphan = folder / "file-orphan1.jsonl", folder / "file-orphan2.jsonl"
    left_by_delete = folder / f"{deleted['id']}.jsonl"  # bytes a failed unlink left: no live row names them
    old_temp, young_temp = folder / f"{TEMP_PREFIX}killed", folder / f"{TEMP_PREFIX}writing"
    for path in (old_orphan, young_orphan, left_by_delete, old_temp, young_temp):
        path.write_bytes(b"{}\n")
    for path in (referenced, old_orphan, left_by_delete):
        age(path, ORPHAN_GRACE_S + 60)
    age(young_orphan, ORPHAN_GRACE_S - 60)
    age(old_temp, STALE_TEMP_S + 60)
    age(young_temp, STALE_TEMP_S - 60)

    removed = sweep_uploads(sessions, mine)
    assert sorted(removed) == sorted([old_orphan, left_by_delete, old_temp])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in (referenced, young_orphan, young_temp)
    )
    assert client.get(f"/v1/files/{kept['id']}/content").content == dataset_lines(3).encode()
    assert sweep_uploads(sessions, mine) == []


def test_an_upload_killed_between_rename_and_commit_leaves_nothing_after_the_sweep(
    settings: Settings, sessions, tmp_path: Path
) -> None:
    mine = own_artifacts(settings, tmp_path)
    key = new_key(sessions)
    env = {
        **os.environ,
        "GT_DATA_DIR": str(mine.data_dir),
        "GT_MODELS_DIR": str(mine.models_dir),
        "GT_ARTIFACTS_DIR": str(mine.artifacts_dir),
        "GT_DATABASE_URL": mine.database_url,
        "GT_BROKER_URL": mine.broker_url,
        "GT_BROKER_PREFIX": mine.broker_prefix,
    }
    died = subprocess.run(
        [sys.executable, "-c", DIES_BEFORE_COMMIT, key, dataset_lines(3)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert died.returncode == 3, died.stderr[-2000:]
    folder = tenant_folder(sessions, mine, key)
    (orphan,) = folder.iterdir()  # renamed into place, complete; no row names it
    assert orphan.read_bytes() == dataset_lines(3).encode()
    with sessions() as session:
        assert session.scalars(select(File).where(File.tenant_id == folder.name)).all() == []

    assert sweep_uploads(sessions, mine) == []  # young: it could be an upload whose commit is in flight
    age(orphan, ORPHAN_GRACE_S + 60)
    app = create_app(mine)
    recover(app.state.session_factory, mine, app.state.queue)  # what every worker runs each minute
    assert list(folder.iterdir()) == []
