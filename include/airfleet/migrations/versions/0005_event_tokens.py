"""Each history entry keeps the fencing token it was written under (a run's writes are
told apart from a later run's, and interleaving would show as a token going down).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("airfleet_events") as batch:
        batch.add_column(sa.Column("token", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("airfleet_events") as batch:
        batch.drop_column("token")
