"""Events looked up by the run that wrote them (each run's note summarises them).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_airfleet_events_run_id", "airfleet_events", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_airfleet_events_run_id", table_name="airfleet_events")
