"""The one command line: ``lightbox``. Each command is a thin shell over a component."""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime, timezone
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from cli.commands.common import (
    console,
    database_label,
    db_session,
    ensure_db,
    setup_logging,
    stop_on_signals,
)
from cli.commands.probes import start_probes, worker_checks
from cli.formatting import print_rows, to_json
from lightbox.errors import ConfigurationError
from lightbox.settings import Settings, get_settings

# Exit codes (README "Exit codes"): 0 done, 1 the command failed, 2 configuration or usage
# error (a bad or unknown LIGHTBOX_* variable, an unreachable database, a wrong argument).
EXIT_CONFIG = 2


class _Lightbox(click.Group):
    """Configuration errors end every command the same way: one line naming the variable and
    what it allows, exit code 2, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import InterfaceError, OperationalError

        try:
            return super().invoke(ctx)
        except ConfigurationError as exc:
            click.echo(f"lightbox: configuration error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
        except (OperationalError, InterfaceError) as exc:
            first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
            click.echo(f"lightbox: LIGHTBOX_DATABASE_URL: database "
                       f"{database_label(get_settings())} not reachable: {first}", err=True)
            sys.exit(EXIT_CONFIG)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Asking a command for its help must work with a broken configuration: that is when
        # an operator reads it.
        ctx.meta["lightbox.help_only"] = "--help" in args
        return super().parse_args(ctx, args)


@click.group(cls=_Lightbox)
@click.version_option(package_version("lightbox"), prog_name="lightbox")
def main() -> None:
    """Lightbox: batch AI inference for hospital imaging queues."""
    if click.get_current_context().meta.get("lightbox.help_only"):
        return
    settings = get_settings()  # every command starts from a valid configuration
    os.umask(settings.file_umask)  # patient data: files 0600, folders 0700 by default
    setup_logging(settings)
    # Which state this command works on: a relative default data dir run from another folder
    # is a different (maybe empty) one.
    logging.getLogger("lightbox").info("data dir %s, database %s", settings.data_path,
                                       database_label(settings))


@main.group()
def db() -> None:
    """Database administration."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema to the newest revision (PostgreSQL: under an advisory
    lock, so several nodes may run it at once). In cluster mode the one step that migrates."""
    from db.migrate import current_revision, upgrade

    settings = get_settings()
    upgrade(settings.sqlalchemy_url)

    console.print(f"database at revision {current_revision(settings.sqlalchemy_url)}")


@main.command()
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--move", is_flag=True, help="Remove each source file once registered.")
def ingest(paths: tuple[Path, ...], move: bool) -> None:
    """Register DICOM files or folders (one-shot)."""
    from rich.progress import Progress

    from scheduler.ingest.folder import ingest_paths, iter_files

    settings = get_settings()
    setup_logging(settings)
    ensure_db(settings)
    total = sum(1 for _ in iter_files(paths))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("ingesting", total=total)
        counts = ingest_paths(settings, list(paths), move=move,
                              on_result=lambda *_: progress.advance(task))
    console.print(to_json(dict(counts)))


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
def watch(directory: Path) -> None:
    """Watch a folder and ingest every file dropped into it (files are moved out)."""
    from scheduler.ingest.folder import watch as run_watch

    settings = get_settings()
    setup_logging(settings)
    if not directory.is_dir():
        log = logging.getLogger("lightbox.watch")
        if directory.exists():
            raise click.ClickException(f"{directory} is not a folder")
        log.warning("watched folder %s does not exist: creating it (check the path if "
                    "files were expected there)", directory.absolute())
    ensure_db(settings)
    counts = run_watch(settings, directory, stop_on_signals())
    logging.getLogger("lightbox.watch").info("watch stopped: %s", dict(counts))


@main.command()
def scheduler() -> None:
    """Run the scheduler: readiness, routing, dispatch, requeue of failed and lost jobs."""
    from lightbox.celery_app import make_celery
    from scheduler.scheduling.passes import run_scheduler

    settings = get_settings()
    setup_logging(settings)
    ensure_db(settings)
    start_probes(settings, system=True)
    run_scheduler(settings, make_celery(settings), stop_on_signals())


@main.command()
@click.option("--explain-layout", is_flag=True,
              help="Print the layout sized to this node (worker/layout.py) and why, and exit.")
def worker(explain_layout: bool) -> None:
    """Run an inference worker (Celery threads pool; batches images across jobs)."""
    from worker.tasks import run_worker

    settings = get_settings()
    if explain_layout:
        from worker.gpu_decode import describe
        from worker.layout import gpu_runs_model, node_layout

        gpu, reason = gpu_runs_model(settings)
        click.echo(node_layout(settings).explain())
        click.echo(f"GPU detection: {'yes' if gpu else 'no'} ({reason})")
        click.echo(describe(settings))
        return
    setup_logging(settings)
    ensure_db(settings)
    start_probes(settings, worker_checks())
    run_worker(settings, loglevel=settings.log_level.upper())


@main.command()
@click.option("--study", "study_uid", help="Study Instance UID.")
@click.option("--label")
@click.option("--min-score", type=float)
@click.option("--since", type=click.DateTime(), help="Findings created at or after (UTC).")
@click.option("--all", "include_superseded", is_flag=True, help="Include superseded findings.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table")
@click.option("--series", "series_level", is_flag=True,
              help="JSON/CSV: series-level findings of volume models instead (the table shows "
                   "both).")
def results(study_uid: str | None, label: str | None, min_score: float | None,
            since: datetime | None, include_superseded: bool, fmt: str,
            series_level: bool = False) -> None:
    """Query findings."""
    from cli.formatting import series_findings_table
    from db.queries import findings
    from db.volume_queries import series_findings

    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    with db_session(read_only=True) as session:
        rows = findings(session, study_uid=study_uid, label=label, min_score=min_score,
                        since=since, include_superseded=include_superseded)
        series_rows = series_findings(session, study_uid=study_uid, label=label,
                                      min_score=min_score, since=since,
                                      include_superseded=include_superseded)
        state = None
        if study_uid and not rows and not series_rows:
            from db.study_queries import study_detail

            detail = study_detail(session, study_uid)
            state = "not known" if detail is None else detail["state"]
    if series_level and fmt != "table":
        print_rows(console, series_rows, fmt)
        return
    print_rows(console, rows, fmt)
    if fmt == "table" and series_rows:
        console.print(series_findings_table(series_rows))
    if state is not None:  # on stderr: the table/JSON/CSV on stdout stays parseable
        click.echo(f"no findings: study {study_uid} is {state}; why: lightbox explain "
                   f"{study_uid}", err=True)


def queue_depth(settings: Settings) -> int | None:
    from lightbox.redis_server import broker_url, redis_client
    from lightbox.task_names import queue_keys

    try:
        client = redis_client(broker_url(settings, start=False))
        return int(sum(client.llen(k) for k in queue_keys()))
    except Exception:  # noqa: BLE001 - Redis down is a status to report, not a crash
        return None


@main.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--limit", default=50, show_default=True,
              help="Newest failed/dead jobs and quarantined files to list (0 = all).")
def status(fmt: str, limit: int) -> None:
    """Jobs by state, queue depth, workers seen, failed and dead jobs with their reasons, and
    quarantined files with theirs."""
    from rich.markup import escape

    from db.queries import status as query_status
    from lightbox.redis_server import embedded_redis_running

    settings = get_settings()
    with db_session(read_only=True) as session:
        report = query_status(session, limit=limit or None,
                              gone_after_seconds=settings.heartbeat_timeout_seconds)
    report["queue_depth"] = queue_depth(settings)
    report["embedded_redis"] = None if settings.redis_url else (
        "running" if embedded_redis_running(settings) else "not running")
    if fmt == "json":
        print(to_json(report))
        return
    table = Table(title="Jobs")
    for state in report["jobs"]:
        table.add_column(state)
    table.add_row(*(str(v) for v in report["jobs"].values()))
    console.print(table)
    depth = report["queue_depth"]
    console.print(f"studies: {report['studies']}   queue depth: "
                  f"{'unavailable (Redis not reachable)' if depth is None else depth}")
    if report["embedded_redis"] == "not running":
        console.print("[yellow]embedded Redis not running[/yellow] (the scheduler or a worker "
                      "starts it; `lightbox stop` ends it)")
    for w in report["workers"]:
        console.print(f"worker {w['hostname']} runtime={w['runtime']} {w['state']}, last seen "
                      f"{w['last_seen_at']}")
    for job in report["problem_jobs"]:
        console.print(f"[red]job {job['job_id']} {job['state']}[/red] {job['model']} "
                      f"study …{job['study_instance_uid'][-16:]}: {job['error_code']}: "
                      f"{escape(job['error_detail'] or '')}", highlight=False)
    for q in report["quarantined"]:
        console.print(f"[yellow]quarantined[/yellow] {q['id']} (name digest "
                      f"{q['name_digest'] or '-'}): "
                      f"{escape(q['reason'])} ({q['code']})", highlight=False)
    shown, total = len(report["quarantined"]), report["quarantined_total"]
    if total > shown:
        console.print(f"… {total - shown} more quarantined file(s): --limit 0 lists all")
    for v in report["vanished_instances"]:
        console.print(f"[red]instance {v['sop_instance_uid']}[/red] (study "
                      f"…{v['study_instance_uid'][-16:]}) was acknowledged, then removed from "
                      "the spool before registration: have the sender send it again",
                      highlight=False)
    exports = report.get("exports", {})
    console.print("exports: " + "  ".join(f"{k} {v}" for k, v in exports.items()))
    for e in report.get("dead_exports", []):
        console.print(f"[red]export {e['export_id']} dead[/red] job {e['job_id']} {e['kind']} "
                      f"to {e['destination']} after {e['attempts']} attempt(s): "
                      f"{e['error_code']}: {e['error_detail']}")


@main.command()
@click.option("--studies", default=8, show_default=True, help="Synthetic studies to generate.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for results.")
@click.option("--serve", is_flag=True, help="Afterwards keep everything running with the API "
              "and dashboard (prints the URL and a token); Ctrl-C stops it all.")
def demo(studies: int, timeout: float, serve: bool) -> None:
    """Run the whole path on this machine with nothing else running, then shut it all down."""
    from cli.demo import run_demo

    sys.exit(run_demo(get_settings(), console, studies=studies, timeout=timeout, serve=serve))


@main.command()
def stop() -> None:
    """Stop the embedded Redis of this data dir (saving its data first)."""
    from lightbox.redis_server import stop_embedded_redis

    settings = get_settings()
    if settings.redis_url:
        raise click.ClickException("LIGHTBOX_REDIS_URL is set: Redis is external, not ours "
                                   "to stop")
    stopped = stop_embedded_redis(settings)
    console.print("embedded Redis stopped" if stopped else "embedded Redis was not running")


# Command groups that live in their own modules (one module per area, under cli/commands/).
# Each area registers itself on its own line below.
# -- trainer (compile, models retire) --
from cli.commands.train import compile_command, models, train  # noqa: E402

main.add_command(train)
main.add_command(models)
main.add_command(compile_command)
# -- worker speed --
# -- PACS (scp, stow, pull, export) --
from cli.commands import pacs as _pacs  # noqa: E402

main.add_command(_pacs.scp)
main.add_command(_pacs.api)
main.add_command(_pacs.pull)
main.add_command(_pacs.export)
# -- reliability (jobs, retention) --
from cli.commands.jobs import jobs as _jobs  # noqa: E402

main.add_command(_jobs)
# -- operator's face (explain, demo --serve) --
from cli.commands.explain import explain as _explain  # noqa: E402

main.add_command(_explain)
# -- configuration (config check, config show) --
from cli.commands.config import config as _config  # noqa: E402

main.add_command(_config)


if __name__ == "__main__":
    main()
