"""models: task-aware findings (predicted class, distribution, indeterminate), shadow versions
and their findings, the synthetic flag, and which model wrote a finding

Revision ID: 0004_models
Revises: 0003_reliability
"""
import sqlalchemy as sa
from alembic import op

revision = "0004_models"
down_revision = "0003_reliability"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("predicted_class", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("distribution", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("indeterminate", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.add_column(sa.Column("shadow", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.add_column(sa.Column("synthetic", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.add_column(sa.Column("model_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key("fk_findings_model_id", "models", ["model_id"], ["id"])
        batch_op.drop_constraint("uq_findings_job_sop_label", type_="unique")
        batch_op.create_unique_constraint("uq_findings_job_sop_label_shadow",
                                          ["job_id", "sop_instance_uid", "label", "shadow"])
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shadow", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("shadow")
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.drop_constraint("uq_findings_job_sop_label_shadow", type_="unique")
        batch_op.create_unique_constraint("uq_findings_job_sop_label",
                                          ["job_id", "sop_instance_uid", "label"])
        batch_op.drop_constraint("fk_findings_model_id", type_="foreignkey")
        for column in ("model_id", "synthetic", "shadow", "indeterminate", "distribution",
                       "predicted_class"):
            batch_op.drop_column(column)
