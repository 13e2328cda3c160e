"""The learning rate each epoch trained at (``learning_rate``: the schedule's peak, the automatic rate of
greencore.lr where the job left it "auto").

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 19:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Epochs recorded before did not say; their job's hyperparameters hold the rate.
    with op.batch_alter_table("epochs") as batch:
        batch.add_column(sa.Column("learning_rate", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("epochs") as batch:
        batch.drop_column("learning_rate")
