"""Race-safe get-or-create: several processes (watcher, SCP, STOW) register into the same
studies and series at once, so inserts use ON CONFLICT DO NOTHING and then read the row."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Base

M = TypeVar("M", bound=Base)


def insert_ignore(session: Session, model: type[Base], rows: list[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on SQLite and PostgreSQL."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    session.execute(module.insert(model).values(rows).on_conflict_do_nothing())


def get_or_create(session: Session, model: type[M], key: dict[str, Any], **values: Any) -> M:
    where = [getattr(model, k) == v for k, v in key.items()]
    row = session.scalars(select(model).where(*where)).first()
    if row is not None:
        return row
    insert_ignore(session, model, [{**key, **values}])
    return session.scalars(select(model).where(*where)).one()
