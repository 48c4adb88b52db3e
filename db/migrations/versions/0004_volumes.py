"""volumes: the series a volume job runs on, and series-level findings (issue 17)

Revision ID: 0004_volumes
Revises: 0003_reliability
"""
import sqlalchemy as sa
from alembic import op

revision = "0004_volumes"
down_revision = "0003_reliability"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_series",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id"),
    )
    op.create_table(
        "series_findings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("positive", sa.Boolean(), nullable=False),
        sa.Column("lesion_count", sa.Integer(), nullable=True),
        sa.Column("volume_ml", sa.Float(), nullable=True),
        sa.Column("largest_diameter_mm", sa.Float(), nullable=True),
        sa.Column("centroid_x", sa.Float(), nullable=True),
        sa.Column("centroid_y", sa.Float(), nullable=True),
        sa.Column("centroid_z", sa.Float(), nullable=True),
        sa.Column("mask_path", sa.Text(), nullable=True),
        sa.Column("superseded", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_series_findings_job_id", "series_findings", ["job_id"])
    op.create_index("ix_series_findings_study_id", "series_findings", ["study_id"])


def downgrade() -> None:
    op.drop_index("ix_series_findings_study_id", table_name="series_findings")
    op.drop_index("ix_series_findings_job_id", table_name="series_findings")
    op.drop_table("series_findings")
    op.drop_table("job_series")
