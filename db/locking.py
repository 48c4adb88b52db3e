"""Row claims that let several schedulers (or workers) share one table of work.

On PostgreSQL a claim is ``SELECT ... FOR UPDATE SKIP LOCKED``: each process takes the rows no
other process holds, and nobody waits. SQLite has one writer at a time and no row locks, so
there the query runs as it is (the write lock serialises the claims instead).
"""

from __future__ import annotations

from typing import Any, TypeVar, Unpack

from sqlalchemy import Select
from sqlalchemy.orm import Session

_Query = TypeVar("_Query", bound=Select[Unpack[tuple[Any, ...]]])


def skip_locked(session: Session, query: _Query, *, of: Any = None) -> _Query:
    """``query`` locking the rows it returns and skipping rows another transaction holds
    (PostgreSQL); unchanged on a database without row locks. ``of``: the entity (or
    entities) whose rows are locked when the query joins several tables."""
    if session.get_bind().dialect.name != "postgresql":
        return query
    return query.with_for_update(skip_locked=True, of=of)
