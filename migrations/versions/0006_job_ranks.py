"""A job's ranks and the bytes they exchanged, beside its epochs' (0004): ``jobs.world_size`` (the ranks its
latest attempt runs on; null before a worker takes it), ``communication_bytes`` and
``communication_bytes_full`` (sums over its epochs, kept with them as its FLOPs are).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 19:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("world_size", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("communication_bytes", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("communication_bytes_full", sa.BigInteger(), nullable=False, server_default="0")
        )
    # Every job started before ran as one process, and exchanged nothing.
    op.execute("UPDATE jobs SET world_size = 1 WHERE attempts > 0")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("communication_bytes_full")
        batch.drop_column("communication_bytes")
        batch.drop_column("world_size")
