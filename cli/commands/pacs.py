"""PACS commands: `lightbox scp`, `lightbox api`, `lightbox pull`, `lightbox export`.

Thin shells: each reads settings, migrates the database, and calls its component."""

from __future__ import annotations

import logging
from datetime import date, datetime

import click
from rich.console import Console

from cli.commands.common import ensure_db, setup_logging, stop_on_signals
from cli.commands.probes import add_probe_routes, scp_checks, start_probes
from cli.formatting import to_json
from lightbox.settings import get_settings

console = Console(stderr=True)


@click.command()
def scp() -> None:
    """Run the DICOM Storage SCP (C-STORE, C-ECHO) that registers what PACS and modalities send."""
    from scheduler.ingest.scp import run_scp

    settings = get_settings()
    setup_logging(settings)
    ensure_db(settings)
    start_probes(settings, scp_checks())
    counts = run_scp(settings, stop_on_signals())
    logging.getLogger("lightbox.scp").info("scp stopped: %s", counts)


@click.command()
def api() -> None:
    """Run the HTTP API and dashboard: REST API v1, DICOMweb STOW-RS, the dashboard at /
    (tokens required: LIGHTBOX_API_TOKENS or LIGHTBOX_API_TOKEN)."""
    import uvicorn

    from scheduler.web.app import make_app

    settings = get_settings()
    setup_logging(settings)
    ensure_db(settings)
    from lightbox.errors import ConfigurationError

    try:
        app = make_app(settings)
    except ConfigurationError as exc:
        raise click.ClickException(f"{exc}: the API never runs unauthenticated") from exc
    add_probe_routes(app, settings)
    # SIGTERM: uvicorn stops accepting and finishes requests in flight (a STOW in progress),
    # then re-raises the signal to the handlers it found: ours only note it, so the process
    # exits 0 like the other commands instead of dying of the signal.
    stop_on_signals()
    uvicorn.run(app, host=settings.api_host, port=settings.api_port,
                log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=int(settings.shutdown_grace_seconds))


def _dicom_date(value: str) -> str:
    try:
        return date.fromisoformat(value).strftime("%Y%m%d")
    except ValueError:
        datetime.strptime(value, "%Y%m%d")
        return value


@click.command()
@click.option("--since", "since", help="First study date (YYYY-MM-DD or YYYYMMDD).")
@click.option("--until", "until", help="Last study date (inclusive).")
@click.option("--modality", "modalities", multiple=True, help="Modality in study (repeatable).")
@click.option("--study", "study_uids", multiple=True, help="A Study Instance UID (repeatable).")
@click.option("--method", type=click.Choice(["move", "get"]), default="move", show_default=True,
              help="C-MOVE to our SCP (must be running and known to the PACS) or C-GET.")
@click.option("--dry-run", is_flag=True, help="Only list what C-FIND matched.")
def pull(since: str | None, until: str | None, modalities: tuple[str, ...],
         study_uids: tuple[str, ...], method: str, dry_run: bool) -> None:
    """Backfill: C-FIND studies on the configured PACS, then retrieve them (C-MOVE or C-GET)."""
    from rich.progress import Progress

    from lightbox.errors import PullError
    from scheduler.ingest.pull import StudyQuery, find_studies, retrieve_studies

    settings = get_settings()
    setup_logging(settings)
    ensure_db(settings)
    try:
        query = StudyQuery(since=_dicom_date(since) if since else None,
                           until=_dicom_date(until) if until else None,
                           modalities=tuple(modalities), study_uids=tuple(study_uids))
    except ValueError as exc:
        raise click.ClickException(f"invalid date: {exc}") from exc
    try:
        studies = find_studies(settings, query)
        if dry_run:
            print(to_json({"studies": [s.__dict__ for s in studies]}))
            return
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("retrieving", total=len(studies))
            report = retrieve_studies(settings, studies, method=method,
                                      on_study=lambda *_: progress.advance(task))
    except PullError as exc:
        raise click.ClickException(str(exc)) from exc
    print(to_json(report))


@click.command()
@click.option("--once", is_flag=True, help="One pass (build + send), then exit.")
def export(once: bool) -> None:
    """Run the export outbox: build SR/heatmap SC for succeeded jobs and send them."""
    from scheduler.export.outbox import export_pass, run_export

    settings = get_settings()
    setup_logging(settings)
    ensure_db(settings)
    if once:
        print(to_json(export_pass(settings)))
        return
    start_probes(settings)
    run_export(settings, stop_on_signals())  # SIGTERM: the pass under way ends, then exit
