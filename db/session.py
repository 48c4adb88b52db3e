"""Engines and sessions. SQLite gets WAL and a busy timeout so the scheduler, watcher and
workers (separate processes) can share one file; PostgreSQL gets a pre-ping pool so a restarted
server costs a retry, not a crash."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Session options of this process's PostgreSQL connections (set by workers, see below).
_PG_OPTIONS: list[str] = []


def set_worker_timeouts(seconds: float) -> None:
    """Give this process's PostgreSQL sessions a ``lock_timeout``, ``statement_timeout`` and
    ``idle_in_transaction_session_timeout`` of ``seconds``. Workers call it at start: a worker
    frozen inside a transaction (SIGSTOP, a stuck host) would otherwise hold its job's row
    lock for ever, and the scheduler's stale-heartbeat check (which skips locked rows, so
    several schedulers can share the work) would never see the job. The server ends such a
    session after ``seconds``; the lock goes with it. Call before the first session."""
    ms = max(1, int(seconds * 1000))
    _PG_OPTIONS[:] = [f"-c lock_timeout={ms}", f"-c statement_timeout={ms}",
                      f"-c idle_in_transaction_session_timeout={ms}"]
    sessionmaker_for.cache_clear()


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.drivername == "postgresql":  # plain postgresql:// means psycopg 3 here
        parsed = parsed.set(drivername="postgresql+psycopg")
    connect_args = {"options": " ".join(_PG_OPTIONS)} if _PG_OPTIONS else {}
    return create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=5,
                         connect_args=connect_args)


@lru_cache(maxsize=8)
def sessionmaker_for(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=make_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    session = sessionmaker_for(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
