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


# pg_advisory_lock key of schema migrations ("LBDB"): one migrator at a time per database.
MIGRATION_LOCK_KEY = 0x4C424442


def upgrade(url: str, revision: str = "heads") -> None:
    """Migrate to every head: independent features may add migrations branching from one base.

    On PostgreSQL a session advisory lock serialises migrators: several nodes starting at once
    (a Job and an old-style command, two replicas of a migration Job) wait for one another
    instead of racing on DDL; the one that comes second finds nothing left to do."""
    from sqlalchemy import text

    from db.session import sessionmaker_for

    engine = sessionmaker_for(url).kw["bind"]
    if engine.dialect.name != "postgresql":
        command.upgrade(alembic_config(url), revision)
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        conn.commit()  # the lock is the session's; leave no transaction open around it
        try:
            command.upgrade(alembic_config(url), revision)
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            conn.commit()


def expected_revisions() -> set[str]:
    """The heads this code's migrations lead to."""
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory(str(MIGRATIONS_DIR)).get_heads())


def check_revision(url: str) -> None:
    """Refuse a schema this code was not written for (cluster mode: migrations are a step of
    their own, so a command must not start on an old schema nor on one a newer release made).
    Raises ConfigurationError with a one-line message naming what to run."""
    from alembic.script import ScriptDirectory

    from lightbox.errors import ConfigurationError

    script = ScriptDirectory(str(MIGRATIONS_DIR))
    applied = set((current_revision(url) or "").split(",")) - {""}
    expected = expected_revisions()
    known = {rev.revision for rev in script.walk_revisions()}
    if applied - known:
        raise ConfigurationError(
            f"database schema {','.join(sorted(applied))} is newer than this Lightbox "
            f"({','.join(sorted(expected))}): run this release's newer image or version")

    def closure(heads: set[str]) -> set[str]:  # with what they revise and depend on
        seen: set[str] = set()
        todo = list(heads)
        while todo:
            rev = script.get_revision(todo.pop())
            if rev is None or rev.revision in seen:
                continue
            seen.add(rev.revision)
            for parents in (rev.down_revision, rev.dependencies):
                todo.extend([parents] if isinstance(parents, str) else parents or ())
        return seen

    if closure(applied) != closure(expected):
        raise ConfigurationError(
            f"database schema {','.join(sorted(applied)) or 'empty'} is older than this "
            f"Lightbox ({','.join(sorted(expected))}): run `lightbox db upgrade` first "
            "(cluster mode)")


def current_revision(url: str) -> str | None:
    """The applied revisions, comma separated (several when branches are applied)."""
    from alembic.runtime.migration import MigrationContext

    from db.session import sessionmaker_for

    engine = sessionmaker_for(url).kw["bind"]
    with engine.connect() as conn:
        heads = MigrationContext.configure(conn).get_current_heads()
        return ",".join(sorted(heads)) or None
