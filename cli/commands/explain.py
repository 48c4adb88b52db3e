"""`lightbox explain STUDY_UID`: why a study has (or has no) findings, from the shell.

The same timeline as the dashboard's study page and ``GET /api/v1/studies/{uid}``
(:func:`db.study_queries.study_detail`): received instances, quarantined files, routing or the
reason it was unrouted, jobs claimed, failed, retried, exports sent or dead."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape

from cli.commands.common import db_session
from cli.formatting import to_json

console = Console()


@click.command()
@click.argument("study_uid")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def explain(study_uid: str, fmt: str) -> None:
    """The timeline of one study: what Lightbox did with it, and why."""
    from db.study_queries import study_detail

    with db_session() as session:
        detail = study_detail(session, study_uid)
    if detail is None:
        raise click.ClickException(f"study {study_uid} is not known to this Lightbox "
                                   "(never received, or received by another database)")
    if fmt == "json":
        print(to_json({k: detail[k] for k in ("study_instance_uid", "state", "priority",
                                              "revision", "jobs", "exports", "timeline")}))
        return
    positive = sorted({f["label"] for f in detail["findings"]
                       if f["positive"] and not f["superseded"]})
    console.print(f"study {detail['study_instance_uid']}: [bold]{detail['state']}[/bold], "
                  f"priority {detail['priority']}, revision {detail['revision']}, "
                  f"{sum(not f['superseded'] for f in detail['findings'])} finding(s)"
                  + (f", positive: {', '.join(positive)}" if positive else ""),
                  highlight=False, soft_wrap=True)
    for entry in detail["timeline"]:
        when = entry["at"].strftime("%Y-%m-%d %H:%M:%S") if entry["at"] else "?"
        console.print(f"{when}  {escape(entry['text'])}", highlight=False, soft_wrap=True)
