"""Running the Alembic migrations from code (``greentrainer migrate``, ``serve``, tests), from any folder."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url`` pointing at the installed ``migrations`` package."""
    config = Config()
    # The first entry of __path__: the package folder (also when an editable install makes it a namespace).
    config.set_main_option("script_location", str(Path(next(iter(migrations.__path__)))))
    config.attributes["url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (creates the tables on an empty database)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Migrate the database down to ``revision`` (``base``: no tables left)."""
    command.downgrade(alembic_config(database_url), revision)
