"""What every `lightbox` command module shares: the console, logging set-up, stop signals and a
migrated database session. One copy, so the command modules cannot drift apart."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click
from rich.console import Console

from lightbox.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

# Wide enough for the findings table when output goes to a file or CI log.
console = Console(width=None if sys.stdout.isatty() else 120)


def setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM: long-running commands stop cleanly on either."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def ensure_db(settings: Settings) -> None:
    from db.migrate import check_revision, upgrade

    if settings.cluster:  # migrations are a step of their own (`lightbox db upgrade`)
        from lightbox.errors import ConfigurationError

        try:
            check_revision(settings.sqlalchemy_url)
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from exc
        return
    upgrade(settings.sqlalchemy_url)


@contextmanager
def db_session() -> Iterator[Session]:
    """A migrated database's session for one command; Lightbox errors become CLI errors."""
    from db.session import session_scope
    from lightbox.errors import LightboxError

    settings = get_settings()
    ensure_db(settings)
    try:
        with session_scope(settings.sqlalchemy_url) as session:
            yield session
    except LightboxError as exc:
        raise click.ClickException(str(exc)) from exc
