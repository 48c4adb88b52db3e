"""`lightbox db upgrade`: Alembic, configured in code so it works from an installed package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "heads") -> None:
    """Migrate to every head: independent features may add migrations branching from one base."""
    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The applied revisions, comma separated (several when branches are applied)."""
    from alembic.runtime.migration import MigrationContext

    from db.session import sessionmaker_for

    engine = sessionmaker_for(url).kw["bind"]
    with engine.connect() as conn:
        heads = MigrationContext.configure(conn).get_current_heads()
        return ",".join(sorted(heads)) or None
