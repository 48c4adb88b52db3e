"""Alembic environment. Batch mode so ALTERs work on SQLite too."""

from __future__ import annotations

from alembic import context

from db.models import Base
from db.session import make_engine

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "sqlalchemy.url must be set (db.migrate.alembic_config does)"
URL: str = url


def run_migrations_online() -> None:
    engine = make_engine(URL)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
