"""Read-side queries behind `lightbox results` and `lightbox status` (and later the REST API)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import (
    Event,
    Finding,
    Job,
    JobState,
    Model,
    QuarantinedFile,
    Study,
    StudyStatus,
    WorkerNode,
)


def findings(session: Session, *, study_uid: str | None = None, label: str | None = None,
             min_score: float | None = None, since: datetime | None = None,
             include_superseded: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
    query = (
        select(Study.study_instance_uid, Finding.series_instance_uid, Finding.sop_instance_uid,
               Model.name, Model.version, Finding.label, Finding.score, Finding.threshold,
               Finding.positive, Finding.superseded, Finding.created_at, Job.id)
        .join(Job, Finding.job_id == Job.id)
        .join(Model, Job.model_id == Model.id)
        .join(Study, Finding.study_id == Study.id)
        .order_by(Finding.created_at, Study.study_instance_uid, Finding.sop_instance_uid)
    )
    if study_uid:
        query = query.where(Study.study_instance_uid == study_uid)
    if label:
        query = query.where(Finding.label == label)
    if min_score is not None:
        query = query.where(Finding.score >= min_score)
    if since is not None:
        query = query.where(Finding.created_at >= since)
    if not include_superseded:
        query = query.where(Finding.superseded.is_(False))
    if limit:
        query = query.limit(limit)
    keys = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "model",
            "model_version", "label", "score", "threshold", "positive", "superseded",
            "created_at", "job_id")
    return [dict(zip(keys, row, strict=True)) for row in session.execute(query)]


def status(session: Session, limit: int | None = 50) -> dict[str, Any]:
    """Counts, plus the newest ``limit`` failed/dead jobs and quarantined files (None: all)."""
    jobs = {s.value: 0 for s in JobState}
    for state, count in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        jobs[state.value] = count
    studies = {s.value: 0 for s in StudyStatus}
    for status, count in session.execute(select(Study.status, func.count())
                                         .group_by(Study.status)):
        studies[status.value] = count
    problems = session.execute(
        select(Job.id, Study.study_instance_uid, Model.name, Job.state, Job.attempts,
               Job.error_code, Job.error_detail)
        .join(Study, Job.study_id == Study.id).join(Model, Job.model_id == Model.id)
        .where(Job.state.in_([JobState.failed, JobState.dead]))
        .order_by(Job.id.desc()).limit(limit)
    )
    quarantined = session.execute(
        select(QuarantinedFile.original_name, QuarantinedFile.reason_code, QuarantinedFile.reason,
               QuarantinedFile.quarantine_path, QuarantinedFile.at)
        .order_by(QuarantinedFile.id.desc()).limit(limit)
    )
    # Acknowledged by the SCP, then removed from its spool before registration: the sender
    # has to send these again (scheduler/spool.py records them).
    vanished = [instance for detail in session.scalars(
        select(Event.detail).where(Event.kind == "spool_instance_vanished")
        .order_by(Event.id.desc()).limit(limit)) for instance in detail["instances"]]
    workers = session.execute(
        select(WorkerNode.hostname, WorkerNode.runtime, WorkerNode.last_seen_at)
        .order_by(WorkerNode.last_seen_at.desc()).limit(50)
    )
    return {
        "jobs": jobs,
        "studies": studies,
        "problem_jobs": [
            {"job_id": r[0], "study_instance_uid": r[1], "model": r[2], "state": r[3].value,
             "attempts": r[4], "error_code": r[5], "error_detail": r[6]} for r in problems
        ],
        "quarantined_total": session.scalar(select(func.count()).select_from(QuarantinedFile)),
        "quarantined": [
            {"name": r[0], "code": r[1], "reason": r[2], "path": r[3], "at": r[4]}
            for r in quarantined
        ],
        "vanished_instances": vanished,
        "workers": [{"hostname": r[0], "runtime": r[1], "last_seen_at": r[2]} for r in workers],
        **export_status(session),
    }


def export_status(session: Session) -> dict[str, Any]:
    """The export outbox (PACS results): rows by state and the latest dead ones."""
    from db.models import Export, ExportState

    exports = {s.value: 0 for s in ExportState}
    for state, count in session.execute(select(Export.state, func.count())
                                        .where(Export.kind != "none").group_by(Export.state)):
        exports[state.value] = count
    dead = session.execute(
        select(Export.id, Export.job_id, Export.destination, Export.kind, Export.attempts,
               Export.error_code, Export.error_detail)
        .where(Export.state == ExportState.dead).order_by(Export.id.desc()).limit(50))
    return {
        "exports": exports,
        "dead_exports": [
            {"export_id": r[0], "job_id": r[1], "destination": r[2], "kind": r[3],
             "attempts": r[4], "error_code": r[5], "error_detail": r[6]} for r in dead
        ],
    }


def studies_pending(session: Session, study_uids: list[str]) -> int:
    """How many of ``study_uids`` are not finished: not yet registered, still receiving, or with a
    job that is not terminal. Unrouted studies count as finished (they were decided)."""
    open_states = [JobState.queued, JobState.running, JobState.failed]
    open_jobs = (select(Job.study_id).where(Job.state.in_(open_states))
                 .group_by(Job.study_id).subquery())
    rows = session.execute(
        select(Study.study_instance_uid, Study.status, open_jobs.c.study_id)
        .outerjoin(open_jobs, open_jobs.c.study_id == Study.id)
        .where(Study.study_instance_uid.in_(study_uids))
    ).all()
    pending = len(set(study_uids) - {r[0] for r in rows})
    for _uid, status_, open_study in rows:
        if status_ == StudyStatus.receiving or (
                status_ == StudyStatus.dispatched and open_study is not None):
            pending += 1
    return pending
