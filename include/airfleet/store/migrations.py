"""Run the store's Alembic migrations programmatically (no alembic.ini needed)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine

SCRIPT_LOCATION = Path(__file__).resolve().parent.parent / "migrations"
VERSION_TABLE = "airfleet_alembic_version"


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Upgrade to ``revision`` (idempotent) and return the revision the database is at."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)
    return current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE}).get_current_revision()
