"""OpenAI's fine-tuning job shape: a job's metadata and trained tokens; the first state is validating_files;
a deleted file's row stays while finished jobs name it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 09:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("metadata", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("trained_tokens", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET status = 'validating_files' WHERE status = 'validating'")
    op.execute(
        "UPDATE jobs SET trained_tokens = "
        "(SELECT COALESCE(SUM(epochs.tokens), 0) FROM epochs WHERE epochs.job_id = jobs.id)"
    )
    op.execute("UPDATE events SET level = 'warn' WHERE level = 'warning'")


def downgrade() -> None:
    op.execute("UPDATE events SET level = 'warning' WHERE level = 'warn'")
    op.execute("UPDATE jobs SET status = 'validating' WHERE status = 'validating_files'")
    op.execute(
        "DELETE FROM files WHERE deleted_at IS NOT NULL AND id NOT IN (SELECT training_file FROM jobs) "
        "AND id NOT IN (SELECT validation_file FROM jobs WHERE validation_file IS NOT NULL)"
    )
    with op.batch_alter_table("files") as batch:
        batch.drop_column("deleted_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("trained_tokens")
        batch.drop_column("metadata")
