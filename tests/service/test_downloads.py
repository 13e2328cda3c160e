"""A checkpoint download holds no database connection while it streams: slow downloads cannot exhaust the
pool that every other request needs."""

from __future__ import annotations

import tarfile
from io import BytesIO

from fastapi.testclient import TestClient

from api import archive
from api.config import Settings
from api.db import SessionFactory
from tests.service.service_calls import JOBS, add_checkpoint, create_job


def test_a_checkpoint_streams_without_holding_a_database_connection(
    app, key: str, sessions: SessionFactory, settings: Settings, monkeypatch
) -> None:
    engine = app.state.session_factory.kw["bind"]
    held: list[int] = []
    stream = archive.TarPlan.stream

    def watched(plan: archive.TarPlan):
        for chunk in stream(plan):
            held.append(engine.pool.checkedout())  # connections out of the pool while a chunk is sent
            yield chunk

    monkeypatch.setattr(archive.TarPlan, "stream", watched)
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    job_id = create_job(client)
    checkpoint_id = add_checkpoint(sessions, settings.artifacts_dir, job_id)
    response = client.get(f"{JOBS}/{job_id}/checkpoints/{checkpoint_id}/content")
    assert response.status_code == 200, response.text
    names = tarfile.open(fileobj=BytesIO(response.content)).getnames()
    assert f"{job_id}-epoch-1/model.safetensors" in names
    assert held and set(held) == {0}
