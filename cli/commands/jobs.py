"""`lightbox jobs ...`: operator commands on jobs. Thin shells over :mod:`db.jobs`; the
scheduler's outbox sends every job these commands put back in the queue."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from cli.commands.common import db_session
from cli.formatting import to_json

console = Console()


def _job(session: Session, job_id: int):  # type: ignore[no-untyped-def]
    from db.models import Job

    job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
    if job is None:
        raise click.ClickException(f"no job {job_id}")
    return job


@click.group()
def jobs() -> None:
    """Inspect, retry, requeue and cancel jobs."""


@jobs.command("list")
@click.option("--state", type=click.Choice(
    ["queued", "running", "succeeded", "failed", "dead", "cancelled"]))
@click.option("--limit", default=50, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def jobs_list(state: str | None, limit: int, fmt: str) -> None:
    """Newest jobs first, with attempts and the last error."""
    from db.models import Job, JobState, Study

    with db_session(read_only=True) as session:
        query = (select(Job.id, Study.study_instance_uid, Job.state, Job.priority, Job.attempts,
                        Job.error_code, Job.error_detail)
                 .join(Study, Job.study_id == Study.id).order_by(Job.id.desc()).limit(limit))
        if state:
            query = query.where(Job.state == JobState(state))
        keys = ("job_id", "study_instance_uid", "state", "priority", "attempts", "error_code",
                "error_detail")
        rows = [dict(zip(keys, (r[0], r[1], r[2].value, r[3].value, *r[4:]), strict=True))
                for r in session.execute(query)]
    if fmt == "json":
        print(to_json(rows))
        return
    table = Table(title="Jobs")
    for key in keys:
        table.add_column(key, overflow="fold")
    for row in rows:
        table.add_row(*(str(row[k] if row[k] is not None else "") for k in keys))
    console.print(table)


@jobs.command("retry")
@click.argument("job_id", type=int)
def jobs_retry(job_id: int) -> None:
    """Put a failed, dead or cancelled job back in the queue with fresh attempts."""
    from db import jobs as job_states

    with db_session() as session:
        job = _job(session, job_id)
        if not job_states.retry(session, job):
            raise click.ClickException(f"job {job_id} is {job.state.value}; only failed, dead or "
                                       "cancelled jobs can be retried")
    console.print(f"job {job_id} queued again")


@jobs.command("requeue")
@click.option("--dead", "dead", is_flag=True, required=True,
              help="Requeue every dead job (required: says what is requeued).")
def jobs_requeue(dead: bool) -> None:
    """Requeue every dead job with fresh attempts (e.g. after a model or storage fix)."""
    from db import jobs as job_states
    from db.models import Job, JobState

    with db_session() as session:
        rows = list(session.scalars(select(Job).where(Job.state == JobState.dead)
                                    .with_for_update()))
        count = sum(job_states.retry(session, job) for job in rows)
    console.print(f"{count} dead job(s) queued again")


@jobs.command("cancel")
@click.argument("job_id", type=int)
def jobs_cancel(job_id: int) -> None:
    """Cancel a job that has not finished (a running attempt's result is discarded)."""
    from db import jobs as job_states

    with db_session() as session:
        job = _job(session, job_id)
        if not job_states.cancel(session, job):
            raise click.ClickException(f"job {job_id} is already {job.state.value}")
    console.print(f"job {job_id} cancelled")
