"""Endpoints: one row per endpoint version, and their history.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "airfleet_endpoints",
        sa.Column("uid", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("version", sa.String(20), nullable=False),
        sa.Column("cluster", sa.String(63), nullable=False),
        sa.Column("served_model", sa.String(256), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("status", sa.JSON, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("observed_generation", sa.Integer, nullable=False),
        sa.Column("row_version", sa.Integer, nullable=False),
        sa.Column("observed_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("deleted_at", TS, nullable=True),
    )
    op.create_index("ix_airfleet_endpoints_name", "airfleet_endpoints", ["name"])
    op.create_index("ix_airfleet_endpoints_cluster", "airfleet_endpoints", ["cluster"])
    op.create_index("ix_airfleet_endpoints_phase", "airfleet_endpoints", ["phase"])
    op.create_index("uq_airfleet_endpoints_live_version", "airfleet_endpoints",
                    ["name", "version"], unique=True,
                    sqlite_where=sa.text("deleted_at IS NULL"),
                    postgresql_where=sa.text("deleted_at IS NULL"))
    op.create_table(
        "airfleet_endpoint_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("endpoint", sa.String(63), nullable=False),
        sa.Column("version", sa.String(20), nullable=False),
        sa.Column("endpoint_uid", sa.String(32), nullable=False),
        sa.Column("cluster", sa.String(63), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("from_phase", sa.String(16), nullable=True),
        sa.Column("to_phase", sa.String(16), nullable=True),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("run_id", sa.String(250), nullable=True),
    )
    op.create_index("ix_airfleet_endpoint_events_endpoint", "airfleet_endpoint_events",
                    ["endpoint"])
    op.create_index("ix_airfleet_endpoint_events_endpoint_uid", "airfleet_endpoint_events",
                    ["endpoint_uid"])
    op.create_index("ix_airfleet_endpoint_events_run_id", "airfleet_endpoint_events",
                    ["run_id"])


def downgrade() -> None:
    op.drop_table("airfleet_endpoint_events")
    op.drop_table("airfleet_endpoints")
