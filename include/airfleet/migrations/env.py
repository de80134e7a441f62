"""Alembic environment of Airfleet's store; run through ``airfleet.store.migrate``."""

from __future__ import annotations

from alembic import context

from airfleet.store.tables import Base

VERSION_TABLE = "airfleet_alembic_version"  # not Airflow's alembic_version, if they share a DB

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  version_table=VERSION_TABLE, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
