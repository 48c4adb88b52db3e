"""reliability: routine jobs escalated to STAT delivery after waiting too long

Revision ID: 0003_reliability
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0003_reliability"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("escalated_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("escalated_at")
