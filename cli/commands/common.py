"""What every `lightbox` command module shares: the console, logging set-up, stop signals and a
migrated database session. One copy, so the command modules cannot drift apart."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

from lightbox.logs import setup_logging as setup_logging  # re-exported for the commands
from lightbox.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

# Wide enough for the findings table when output goes to a file or CI log.
console = Console(width=None if sys.stdout.isatty() else 120)


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM: long-running commands stop cleanly on either."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def database_label(settings: Settings) -> str:
    """The database URL without its password (safe for logs and messages)."""
    from sqlalchemy.engine import make_url

    return make_url(settings.sqlalchemy_url).render_as_string(hide_password=True)


def ensure_db(settings: Settings, *, read_only: bool = False) -> None:
    """Migrate the database (creating it if needed). ``read_only`` commands never create one:
    a relative data dir run from the wrong folder would otherwise report an empty new database
    as if it were the real one. In cluster mode migrations are a step of their own (`lightbox
    db upgrade`): the schema revision is only checked."""
    from db.migrate import check_revision, upgrade
    from lightbox.errors import ConfigurationError

    if read_only and not _database_exists(settings):
        raise ConfigurationError(
            f"no Lightbox database at {database_label(settings)} (data dir "
            f"{settings.data_path}): set LIGHTBOX_DATA_DIR / LIGHTBOX_DATABASE_URL, or create "
            "it with `lightbox db upgrade`")
    if settings.cluster:
        check_revision(settings.sqlalchemy_url)
        return
    upgrade(settings.sqlalchemy_url)


def _database_exists(settings: Settings) -> bool:
    """A SQLite file that exists, or a server database that holds Lightbox's schema."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.sqlalchemy_url)
    if url.get_backend_name() == "sqlite":
        return bool(url.database) and url.database != ":memory:" and \
            Path(str(url.database)).is_file()
    from db.migrate import current_revision

    return current_revision(settings.sqlalchemy_url) is not None


@contextmanager
def db_session(*, read_only: bool = False) -> Iterator[Session]:
    """A migrated database's session for one command; Lightbox errors become CLI errors
    (configuration errors go up to the command line's one-line handler, exit code 2)."""
    from db.session import session_scope
    from lightbox.errors import ConfigurationError, LightboxError

    settings = get_settings()
    ensure_db(settings, read_only=read_only)
    try:
        with session_scope(settings.sqlalchemy_url) as session:
            yield session
    except ConfigurationError:
        raise
    except LightboxError as exc:
        raise click.ClickException(str(exc)) from exc
