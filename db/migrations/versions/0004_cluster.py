"""cluster: paths in the database relative to the storage and models roots

Instances' ``stored_path`` and exports' ``path`` under this node's ``LIGHTBOX_STORAGE_DIR``, and
models' ``bundle_path`` under ``LIGHTBOX_MODELS_DIR``, become relative to those roots, so that
nodes mounting the shared volume at different paths all find the files. Paths outside the roots
stay absolute (they still resolve as they are). Run it with the roots set as on the node that
wrote the rows (the defaults: under ``LIGHTBOX_DATA_DIR``).

Revision ID: 0004_cluster
Revises: 0003_reliability
"""
import sqlalchemy as sa
from alembic import op

from lightbox.settings import Settings

revision = "0004_cluster"
down_revision = "0003_reliability"
branch_labels = None
depends_on = None

# (table, column, root attribute of Settings)
COLUMNS = [("instances", "stored_path", "storage_dir"), ("exports", "path", "storage_dir"),
           ("models", "bundle_path", "models_dir")]


def _strip(table: str, column: str, old_prefix: str) -> None:
    """Remove ``old_prefix`` from the start of ``column`` in one UPDATE (no rows through
    Python: the instances table may hold millions)."""
    t = sa.table(table, sa.column(column, sa.Text))
    col = t.c[column]
    op.execute(t.update()
               .where(col.like(old_prefix.replace("%", r"\%").replace("_", r"\_") + "%",
                               escape="\\"))
               .values({column: sa.func.substr(col, len(old_prefix) + 1)}))


def _tables() -> set[str]:
    # The exports table comes from 0002_pacs, a sibling branch that may run after this one
    # (then it is new and empty: nothing to rewrite).
    return set(sa.inspect(op.get_bind()).get_table_names())


def upgrade() -> None:
    settings = Settings()
    present = _tables()
    for table, column, root in COLUMNS:
        if table not in present:
            continue
        _strip(table, column, str(getattr(settings, root)).rstrip("/") + "/")


def downgrade() -> None:
    settings = Settings()
    present = _tables()
    for table, column, root in COLUMNS:
        if table not in present:
            continue
        prefix = str(getattr(settings, root)).rstrip("/") + "/"
        t = sa.table(table, sa.column(column, sa.Text))
        col = t.c[column]
        op.execute(t.update().where(~col.like("/%")).values({column: sa.literal(prefix) + col}))
