"""Policy bindings and the governance audit trail.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "airfleet_policy_bindings",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("scope", sa.String(63), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("policy", sa.String(63), nullable=False),
        sa.Column("version", sa.String(16), nullable=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("timeout_seconds", sa.Float, nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("url", sa.Text, nullable=True),
        sa.Column("fail_open", sa.Boolean, nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("scope", "action", "policy", name="uq_airfleet_policy_bindings"),
    )
    op.create_table(
        "airfleet_policy_audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("cluster", sa.String(63), nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("policy", sa.String(63), nullable=True),
        sa.Column("version", sa.String(16), nullable=True),
        sa.Column("mode", sa.String(16), nullable=True),
        sa.Column("allowed", sa.Boolean, nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("run_id", sa.String(250), nullable=True),
        sa.Column("actor", sa.String(250), nullable=True),
    )
    op.create_index("ix_airfleet_policy_audit_cluster", "airfleet_policy_audit", ["cluster"])


def downgrade() -> None:
    op.drop_table("airfleet_policy_audit")
    op.drop_table("airfleet_policy_bindings")
