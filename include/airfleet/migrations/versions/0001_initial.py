"""Clusters, events, leases and vault secrets.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "airfleet_clusters",
        sa.Column("uid", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("status", sa.JSON, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("observed_generation", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("observed_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("deleted_at", TS, nullable=True),
    )
    op.create_index("ix_airfleet_clusters_name", "airfleet_clusters", ["name"])
    op.create_index("ix_airfleet_clusters_phase", "airfleet_clusters", ["phase"])
    op.create_index("uq_airfleet_clusters_live_name", "airfleet_clusters", ["name"], unique=True,
                    sqlite_where=sa.text("deleted_at IS NULL"),
                    postgresql_where=sa.text("deleted_at IS NULL"))
    op.create_table(
        "airfleet_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("cluster", sa.String(63), nullable=False),
        sa.Column("cluster_uid", sa.String(32), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("from_phase", sa.String(16), nullable=True),
        sa.Column("to_phase", sa.String(16), nullable=True),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("run_id", sa.String(250), nullable=True),
    )
    op.create_index("ix_airfleet_events_cluster", "airfleet_events", ["cluster"])
    op.create_index("ix_airfleet_events_cluster_uid", "airfleet_events", ["cluster_uid"])
    op.create_table(
        "airfleet_leases",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("holder", sa.String(250), nullable=True),
        sa.Column("token", sa.Integer, nullable=False),
        sa.Column("acquired_at", TS, nullable=True),
        sa.Column("expires_at", TS, nullable=True),
    )
    op.create_table(
        "airfleet_vault_secrets",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("envelope", sa.Text, nullable=False),
        sa.Column("description", sa.String(250), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("rotated_at", TS, nullable=True),
    )
    op.create_index("ix_airfleet_vault_secrets_key_id", "airfleet_vault_secrets", ["key_id"])


def downgrade() -> None:
    for table in ("airfleet_vault_secrets", "airfleet_leases", "airfleet_events",
                  "airfleet_clusters"):
        op.drop_table(table)
