"""quarantine_digest: quarantined files keep a keyed digest of their name and sender, never the
name (a file name can be a patient's name)

Revision ID: 0004_quarantine_digest
Revises: 0003_reliability
"""
import sqlalchemy as sa
from alembic import op

revision = "0004_quarantine_digest"
down_revision = "0003_reliability"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Names recorded before this revision are dropped, not digested: the digest key lives in
    # the data dir, which a migration does not know.
    with op.batch_alter_table("quarantined_files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name_digest", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("sender_digest", sa.String(64), nullable=True))
        batch_op.drop_column("original_name")


def downgrade() -> None:
    with op.batch_alter_table("quarantined_files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("original_name", sa.Text(), nullable=False,
                                      server_default=""))
        batch_op.drop_column("sender_digest")
        batch_op.drop_column("name_digest")
