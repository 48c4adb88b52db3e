"""Logging set-up for every Lightbox process, in the core so that components (the SCP's spool
registrar runs in a process of its own) set it up the same way without importing the CLI."""

from __future__ import annotations

import logging

from lightbox.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(settings: Settings) -> None:
    """Log lines to stderr (stdout stays for a command's output: JSON, tables)."""
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # 7 lines per start
