"""The ranks an epoch ran on and the bytes they exchanged (greencore.distributed): ``world_size``,
``communication_bytes`` and full fine-tuning's ``communication_bytes_full`` on the same steps.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 17:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every epoch recorded before ran as one process: world size 1, nothing exchanged.
    with op.batch_alter_table("epochs") as batch:
        batch.add_column(sa.Column("world_size", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(
            sa.Column("communication_bytes", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("communication_bytes_full", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("epochs") as batch:
        batch.drop_column("communication_bytes_full")
        batch.drop_column("communication_bytes")
        batch.drop_column("world_size")
