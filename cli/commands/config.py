"""`lightbox config check` and `lightbox config show`: the configuration an operator is about to
run, checked or shown (secrets masked) before anything is started."""

from __future__ import annotations

import copy
import json
from typing import Any

import click
from sqlalchemy.engine import make_url

from cli.commands.common import console, database_label
from lightbox.errors import ConfigurationError
from lightbox.settings import SECRET_FIELDS, Settings, get_settings, variable

MASK = "***"


def _mask_url(url: str | None) -> str | None:
    return None if url is None else make_url(url).render_as_string(hide_password=True)


def masked(settings: Settings) -> dict[str, Any]:
    """Every setting by variable name, secrets replaced by ``***``: passwords in URLs, the API
    token and export destinations' tokens."""
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if name in SECRET_FIELDS and value:
            value = MASK
        elif name in ("database_url", "redis_url"):
            value = _mask_url(value)
        elif name == "export_destinations":
            value = copy.deepcopy(value)
            for entry in value:
                if entry.get("token"):
                    entry["token"] = MASK
        values[variable(name)] = str(value) if hasattr(value, "__fspath__") else value
    return values


@click.group()
def config() -> None:
    """Check or show the configuration (LIGHTBOX_* variables)."""


@config.command("show")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def config_show(fmt: str) -> None:
    """Every setting with its value (secrets masked)."""
    values = masked(get_settings())
    if fmt == "json":
        print(json.dumps(values, indent=2, default=str))
        return
    for key, value in values.items():
        console.print(f"{key}={json.dumps(value, default=str)}", highlight=False, soft_wrap=True)


@config.command("check")
def config_check() -> None:
    """Validate every setting, the routing rules and export destinations, and reach the
    database; exit code 2 with one line naming the variable when something is wrong."""
    from db.session import sessionmaker_for
    from scheduler.export.destinations import load_destinations
    from scheduler.scheduling.route import load_rules

    settings = get_settings()
    try:
        load_destinations(settings)
    except ConfigurationError as exc:
        raise ConfigurationError(f"LIGHTBOX_EXPORT_DESTINATIONS: {exc}") from None
    try:
        load_rules(settings.rules_file)
    except ConfigurationError as exc:
        raise ConfigurationError(f"LIGHTBOX_RULES_FILE: {exc}") from None
    engine = sessionmaker_for(settings.sqlalchemy_url).kw["bind"]
    with engine.connect():
        pass
    console.print(f"configuration OK: data dir {settings.data_path}, database "
                  f"{database_label(settings)}", highlight=False, soft_wrap=True)
