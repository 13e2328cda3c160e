"""Migration 0002 (OpenAI's job shape) carries rows written before it: state names, event levels, trained
tokens; and back."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from api.migrate import downgrade, upgrade
from tests.backends import create_pg_database, drop_pg_database

ROWS = [
    "INSERT INTO tenants (id, name, created_at) VALUES ('tenant-1', 'acme', '2026-12-01')",
    "INSERT INTO files (id, tenant_id, filename, purpose, bytes, sha256, format, examples, path, created_at) "
    "VALUES ('file-1', 'tenant-1', 't.jsonl', 'fine-tune', 1, 'x', 'messages', 1, 'f', '2026-12-01')",
    "INSERT INTO jobs (id, tenant_id, model, training_file, method, hyperparameters, seed, status, "
    "created_at, attempts, epochs_done, flops_total, flops_full, energy_j, gco2e) VALUES "
    "('ftjob-1', 'tenant-1', 'demo', 'file-1', 'green', '{}', 0, 'validating', '2026-12-01', "
    "0, 0, 0, 0, 0, 0), "
    "('ftjob-2', 'tenant-1', 'demo', 'file-1', 'green', '{}', 0, 'succeeded', '2026-12-01', "
    "1, 2, 0, 0, 0, 0)",
    "INSERT INTO epochs (job_id, epoch, selected_tensors, flops, rho_achieved, tokens, steps, "
    "truncated_examples, dropped_examples, wall_s, energy_j, energy_method, gco2e, created_at) VALUES "
    "('ftjob-2', 1, '[]', '{}', 0.5, 100, 1, 0, 0, 1, 1, 'estimate', 0, '2026-12-01'), "
    "('ftjob-2', 2, '[]', '{}', 0.5, 50, 1, 0, 0, 1, 1, 'estimate', 0, '2026-12-01')",
    "INSERT INTO events (job_id, type, level, message, created_at) VALUES "
    "('ftjob-1', 'error', 'warning', 'broker down', '2026-12-01')",
]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_rows_written_before_0002_read_as_openai_names(kind: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gt.db'}" if kind == "sqlite" else create_pg_database()
    engine = create_engine(url)
    try:
        upgrade(url, "0001")
        with engine.begin() as conn:
            for statement in ROWS:
                conn.execute(text(statement))
        upgrade(url, "0002")
        with engine.connect() as conn:
            jobs = dict(conn.execute(text("SELECT id, status FROM jobs")).all())
            tokens = dict(conn.execute(text("SELECT id, trained_tokens FROM jobs")).all())
            levels = [r[0] for r in conn.execute(text("SELECT level FROM events"))]
        assert jobs == {"ftjob-1": "validating_files", "ftjob-2": "succeeded"}
        assert tokens == {"ftjob-1": 0, "ftjob-2": 150}
        assert levels == ["warn"]
        downgrade(url, "0001")
        with engine.connect() as conn:
            assert dict(conn.execute(text("SELECT id, status FROM jobs")).all())["ftjob-1"] == "validating"
            assert [r[0] for r in conn.execute(text("SELECT level FROM events"))] == ["warning"]
    finally:
        engine.dispose()
        if kind != "sqlite":
            drop_pg_database(url)
