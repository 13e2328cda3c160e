"""API keys from the command line (`greentrainer keys list|revoke`), run as real processes against the
database of an app that is already serving."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from api.config import Settings
from api.keys import key_sha256
from tests.service.service_calls import JOBS, new_key


def greentrainer(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `greentrainer` command on the settings' database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GT_")}
    env.update(GT_DATABASE_URL=str(settings.database_url), GT_DATA_DIR=str(settings.data_dir))
    command = [str(Path(sys.executable).parent / "greentrainer"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def listed(settings: Settings, tenant: str) -> dict[str, list[str]]:
    """`keys list --tenant`: its rows by prefix, each [id, tenant, name, prefix, created, revoked]."""
    done = greentrainer(settings, "keys", "list", "--tenant", tenant)
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert header.split() == ["id", "tenant", "name", "prefix", "created", "revoked"]
    return {line.split()[3]: line.split() for line in lines}


def test_a_revoked_key_answers_401_on_the_very_next_request(app, settings: Settings, sessions) -> None:
    tenant = f"tenant-{secrets.token_hex(4)}"
    key, other = new_key(sessions, tenant), new_key(sessions, tenant)
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    other_client = TestClient(app, headers={"Authorization": f"Bearer {other}"})
    assert client.get(JOBS).status_code == other_client.get(JOBS).status_code == 200

    done = greentrainer(settings, "keys", "list", "--tenant", tenant)
    for secret in (key, other, key_sha256(key), key_sha256(other)):  # never the key nor its hash
        assert secret not in done.stdout
    rows = listed(settings, tenant)
    assert set(rows) == {key[:12], other[:12]}
    assert all(row[1] == tenant and row[5] == "-" for row in rows.values())

    revoked = greentrainer(settings, "keys", "revoke", key)  # by the key itself
    assert revoked.returncode == 0, revoked.stderr
    response = client.get(JOBS)  # the same app, already serving: nothing cached the tenant
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert other_client.get(JOBS).status_code == 200  # the tenant's other key still works

    again = greentrainer(settings, "keys", "revoke", key[:12])  # by its prefix: nothing changes
    assert again.returncode == 0 and "already revoked" in again.stdout
    rows = listed(settings, tenant)
    assert rows[key[:12]][5] != "-" and rows[other[:12]][5] == "-"

    by_id = greentrainer(settings, "keys", "revoke", rows[other[:12]][0])  # by its id
    assert by_id.returncode == 0, by_id.stderr
    assert other_client.get(JOBS).status_code == 401

    near_miss = other[:12] + "x" * 31  # the prefix of a key, the rest wrong: not that key
    for unknown in ("key-" + "0" * 26, "gt-nothing", near_miss):
        refused = greentrainer(settings, "keys", "revoke", unknown)
        assert refused.returncode == 1 and "no API key matches" in refused.stderr, unknown
    assert near_miss not in refused.stderr  # a key-like argument is not echoed whole
    nobody = greentrainer(settings, "keys", "list", "--tenant", f"nobody-{secrets.token_hex(4)}")
    assert nobody.returncode == 1 and "no tenant named" in nobody.stderr
