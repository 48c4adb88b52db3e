"""Read-side queries behind `lightbox results` and `lightbox status` (and later the REST API)."""

from __future__ import annotations

from datetime import datetime, timezone
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
             include_superseded: bool = False, limit: int | None = None,
             shadow: bool | None = False) -> list[dict[str, Any]]:
    """Findings, newest revision only unless ``include_superseded``. ``shadow``: False (the
    default) production findings only, True shadow findings only, None both. ``model`` and
    ``model_version`` name the version that wrote the row (a shadow version for shadow rows)."""
    query = (
        select(Study.study_instance_uid, Finding.series_instance_uid, Finding.sop_instance_uid,
               Model.name, Model.version, Finding.label, Finding.score, Finding.threshold,
               Finding.positive, Finding.superseded, Finding.created_at, Job.id,
               Finding.predicted_class, Finding.distribution, Finding.indeterminate,
               Finding.shadow, Finding.synthetic)
        .join(Job, Finding.job_id == Job.id)
        .join(Model, func.coalesce(Finding.model_id, Job.model_id) == Model.id)
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
    if shadow is not None:
        query = query.where(Finding.shadow.is_(shadow))
    if limit:
        query = query.limit(limit)
    keys = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "model",
            "model_version", "label", "score", "threshold", "positive", "superseded",
            "created_at", "job_id", "predicted_class", "distribution", "indeterminate",
            "shadow", "synthetic")
    return [dict(zip(keys, row, strict=True)) for row in session.execute(query)]


def _worker_state(last_seen: datetime, gone_after_seconds: float | None) -> str:
    if gone_after_seconds is None:
        return "seen"
    if last_seen.tzinfo is None:  # SQLite returns naive UTC
        last_seen = last_seen.replace(tzinfo=timezone.utc)
    age = (datetime.now(timezone.utc) - last_seen).total_seconds()
    return "gone" if age > gone_after_seconds else "alive"


def status(session: Session, limit: int | None = 50,
           gone_after_seconds: float | None = None) -> dict[str, Any]:
    """Counts, plus the newest ``limit`` failed/dead jobs and quarantined files (None: all).
    A worker not seen for ``gone_after_seconds`` (killed, host lost) is listed as ``gone``."""
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
        select(QuarantinedFile.id, QuarantinedFile.name_digest, QuarantinedFile.sender_digest,
               QuarantinedFile.reason_code, QuarantinedFile.reason,
               QuarantinedFile.quarantine_path, QuarantinedFile.at)
        .order_by(QuarantinedFile.id.desc()).limit(limit)
    )
    # Acknowledged by the SCP, then removed from its spool before registration: the sender
    # has to send these again (scheduler/ingest/spool.py records them).
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
            {"id": r[0], "name_digest": r[1], "sender_digest": r[2], "code": r[3],
             "reason": r[4], "path": r[5], "at": r[6]}
            for r in quarantined
        ],
        "vanished_instances": vanished,
        "workers": [{"hostname": r[0], "runtime": r[1], "last_seen_at": r[2],
                     "state": _worker_state(r[2], gone_after_seconds)} for r in workers],
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


def shadow_pairs(session: Session, name: str, shadow_version: str | None = None,
                 ) -> list[dict[str, Any]]:
    """Production and shadow findings of model ``name`` side by side, per (job, image, label):
    what `lightbox models compare` measures agreement on. Multiclass rows pair by image (one row
    each). Only jobs where both wrote a finding count."""
    from sqlalchemy.orm import aliased

    shadow_model = aliased(Model)
    shadow_finding = aliased(Finding)
    production_model = aliased(Model)
    query = (
        select(Study.study_instance_uid, Finding.sop_instance_uid, Finding.label,
               Finding.score, Finding.positive, Finding.predicted_class, Finding.indeterminate,
               Finding.distribution, shadow_finding.label, shadow_finding.score,
               shadow_finding.positive, shadow_finding.predicted_class,
               shadow_finding.indeterminate, shadow_finding.distribution,
               production_model.version, shadow_model.version, Finding.job_id)
        .join(shadow_finding, (shadow_finding.job_id == Finding.job_id)
              & (shadow_finding.sop_instance_uid == Finding.sop_instance_uid)
              & ((shadow_finding.label == Finding.label)
                 | shadow_finding.predicted_class.is_not(None))
              & shadow_finding.shadow.is_(True))
        .join(shadow_model, shadow_finding.model_id == shadow_model.id)
        .join(Job, Finding.job_id == Job.id)
        .join(production_model, Job.model_id == production_model.id)
        .join(Study, Finding.study_id == Study.id)
        .where(Finding.shadow.is_(False), Finding.superseded.is_(False),
               production_model.name == name, shadow_model.name == name)
        .order_by(Finding.job_id, Finding.sop_instance_uid, Finding.label)
    )
    if shadow_version:
        query = query.where(shadow_model.version == shadow_version)
    keys = ("study_instance_uid", "sop_instance_uid", "label", "score", "positive",
            "predicted_class", "indeterminate", "distribution", "shadow_label", "shadow_score",
            "shadow_positive", "shadow_predicted_class", "shadow_indeterminate",
            "shadow_distribution", "production_version", "shadow_version", "job_id")
    return [dict(zip(keys, row, strict=True)) for row in session.execute(query)]
