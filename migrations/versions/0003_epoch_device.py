"""The device profile an epoch ran on and its validation seconds, so that estimates calibrate on the epochs of
the same device (their training seconds: wall_s - valid_wall_s).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 16:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Epochs recorded before keep a null device: which profile they ran on is not known for all of them
    # (energy_inputs names it only for estimated energy), and a guess would calibrate on the wrong device.
    with op.batch_alter_table("epochs") as batch:
        batch.add_column(sa.Column("device", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("valid_wall_s", sa.Float(), nullable=False, server_default="0"))
    op.create_index("ix_epochs_device_id", "epochs", ["device", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_epochs_device_id", table_name="epochs")
    with op.batch_alter_table("epochs") as batch:
        batch.drop_column("valid_wall_s")
        batch.drop_column("device")
