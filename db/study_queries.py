"""Read-side queries behind the REST API, the dashboard and `lightbox explain`.

A study's *state* is derived, never stored: the writers (registration, dispatch, workers) keep
their own columns and this module reads them. A study is ``receiving`` or ``unrouted`` by its
status; once dispatched, by the jobs of its dispatched revision: ``running`` if one runs,
``failed`` if one is dead, ``waiting`` if one waits for its retry (backoff), ``queued`` if one
waits for a worker, else ``done``.

Lists are paged by keyset (an opaque ``after`` cursor of the last row's sort key), newest first,
so page N costs what page 1 costs on a million rows; OFFSET would scan everything before it.

The *timeline* is every recorded thing that happened to a study, in order: instances received
(grouped by revision and channel), events of the study and of its jobs, jobs queued, exports
sent or dead. It answers "why has this study no finding?" without SQL.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, text, tuple_
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from db.models import (
    Event,
    Export,
    ExportState,
    Finding,
    Instance,
    Job,
    JobState,
    Model,
    Priority,
    QuarantinedFile,
    Series,
    Study,
    StudyStatus,
    WorkerNode,
)

STUDY_STATES = ("receiving", "waiting", "queued", "running", "done", "failed", "unrouted")
MAX_PAGE = 500


class CursorError(ValueError):
    """An ``after`` cursor that this module did not make (HTTP 400)."""


# -- cursors -----------------------------------------------------------------------------------

def encode_cursor(*parts: object) -> str:
    text = "|".join(p.isoformat() if isinstance(p, datetime) else str(p) for p in parts)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode(cursor: str, n: int) -> list[str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise CursorError("invalid 'after' cursor") from exc
    parts = text.split("|")
    if len(parts) != n:
        raise CursorError("invalid 'after' cursor")
    return parts


def _time_id_cursor(cursor: str) -> tuple[datetime, int]:
    when, ident = _decode(cursor, 2)
    try:
        at = datetime.fromisoformat(when)
        return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)), int(ident)
    except ValueError as exc:
        raise CursorError("invalid 'after' cursor") from exc


def _id_cursor(cursor: str) -> int:
    (ident,) = _decode(cursor, 1)
    try:
        return int(ident)
    except ValueError as exc:
        raise CursorError("invalid 'after' cursor") from exc


@dataclass
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


# -- study state ---------------------------------------------------------------------------------

def _current_jobs_in(*states: JobState) -> ColumnElement[bool]:
    return exists().where(Job.study_id == Study.id,
                          Job.study_revision == Study.dispatched_revision,
                          Job.state.in_(states))


def state_condition(state: str) -> ColumnElement[bool]:
    """``WHERE`` form of one state, as semi-joins the planner can drive from the jobs index (a
    rare state such as ``failed`` then costs its few rows, not a CASE over every study)."""
    if state in ("receiving", "unrouted"):
        return Study.status == StudyStatus(state)
    ladder = [("running", JobState.running), ("failed", JobState.dead),
              ("waiting", JobState.failed), ("queued", JobState.queued)]
    dispatched = Study.status == StudyStatus.dispatched
    names = [name for name, _ in ladder]
    if state == "done":
        return and_(dispatched, ~_current_jobs_in(*(s for _, s in ladder)))
    index = names.index(state)
    above = [s for _, s in ladder[:index]]
    condition = and_(dispatched, _current_jobs_in(ladder[index][1]))
    return and_(condition, ~_current_jobs_in(*above)) if above else condition


def no_jit(session: Session) -> None:
    """PostgreSQL's JIT compiles a plan whose estimated cost is high (a filter over a large
    table) and spends ~200 ms doing it, for queries that run in a few ms: off for these reads."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL jit = off"))


def derive_state(status: StudyStatus, job_states: list[JobState]) -> str:
    """The state from the study's status and the states of its dispatched revision's jobs
    (the Python twin of :func:`state_condition`, for rows already fetched)."""
    if status in (StudyStatus.receiving, StudyStatus.unrouted):
        return str(status.value)
    for name, state in (("running", JobState.running), ("failed", JobState.dead),
                        ("waiting", JobState.failed), ("queued", JobState.queued)):
        if state in job_states:
            return name
    return "done"


# -- studies ---------------------------------------------------------------------------------------

@dataclass
class StudyFilters:
    since: datetime | None = None
    until: datetime | None = None
    modality: str | None = None
    state: str | None = None
    label: str | None = None
    min_score: float | None = None
    priority: str | None = None


def list_studies(session: Session, filters: StudyFilters, *, after: str | None = None,
                 limit: int = 50) -> Page:
    """Studies newest first (first instance received), filtered, one keyset page."""
    limit = max(1, min(limit, MAX_PAGE))
    # The state is derived for the page's rows afterwards (one query for 50 studies): as a
    # CASE of EXISTS in the SELECT list, PostgreSQL hashes every dead/queued job per request.
    query = select(Study.id, Study.study_instance_uid, Study.first_received_at,
                   Study.last_received_at, Study.revision, Study.dispatched_revision,
                   Study.priority, Study.status)
    if filters.since is not None:
        query = query.where(Study.first_received_at >= filters.since)
    if filters.until is not None:
        query = query.where(Study.first_received_at < filters.until)
    if filters.priority:
        query = query.where(Study.priority == Priority(filters.priority))
    if filters.modality:
        query = query.where(exists().where(Series.study_id == Study.id,
                                           Series.modality == filters.modality))
    if filters.label or filters.min_score is not None:
        conditions = [Finding.study_id == Study.id, Finding.superseded.is_(False)]
        if filters.label:
            conditions.append(Finding.label == filters.label)
        if filters.min_score is not None:
            conditions.append(Finding.score >= filters.min_score)
        query = query.where(exists().where(*conditions))
    if filters.state:
        if filters.state not in STUDY_STATES:
            raise ValueError(f"state must be one of {', '.join(STUDY_STATES)}")
        query = query.where(state_condition(filters.state))
        no_jit(session)
    if after:
        at, ident = _time_id_cursor(after)
        query = query.where(tuple_(Study.first_received_at, Study.id) < tuple_(at, ident))
    rows = session.execute(
        query.order_by(Study.first_received_at.desc(), Study.id.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    summaries = _study_summaries(session, [r.id for r in rows])
    job_states: dict[int, list[JobState]] = {}
    if rows:
        revisions = {r.id: r.dispatched_revision for r in rows}
        for study_id, revision, state_ in session.execute(
                select(Job.study_id, Job.study_revision, Job.state)
                .where(Job.study_id.in_(list(revisions)))):
            if revision == revisions[study_id]:
                job_states.setdefault(study_id, []).append(state_)
    items = [{
        "study_instance_uid": r.study_instance_uid,
        "state": derive_state(r.status, job_states.get(r.id, [])),
        "priority": r.priority.value, "revision": r.revision,
        "first_received_at": r.first_received_at, "last_received_at": r.last_received_at,
        **summaries.get(r.id, _empty_summary()),
    } for r in rows]
    cursor = encode_cursor(rows[-1].first_received_at, rows[-1].id) if more and rows else None
    return Page(items, cursor)


def _empty_summary() -> dict[str, Any]:
    return {"modalities": [], "body_parts": [], "senders": [], "instances": 0, "findings": 0,
            "positive_labels": [], "max_score": None}


def _study_summaries(session: Session, ids: list[int]) -> dict[int, dict[str, Any]]:
    """Modalities, body parts, senders, instance and finding counts of a page of studies (a few
    grouped queries for the whole page, not one per study)."""
    out: dict[int, dict[str, Any]] = {i: _empty_summary() for i in ids}
    if not ids:
        return out
    for study_id, modality, tags in session.execute(
            select(Series.study_id, Series.modality, Series.tags)
            .where(Series.study_id.in_(ids))):
        row = out[study_id]
        if modality and modality not in row["modalities"]:
            row["modalities"].append(modality)
        part = (tags or {}).get("BodyPartExamined")
        if part and part not in row["body_parts"]:
            row["body_parts"].append(part)
    for study_id, source, count in session.execute(
            select(Series.study_id, Instance.source, func.count())
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(ids)).group_by(Series.study_id, Instance.source)):
        out[study_id]["instances"] += count
        sender = _channel(source)
        if sender not in out[study_id]["senders"]:
            out[study_id]["senders"].append(sender)
    for study_id, label, positive, count, top in session.execute(
            select(Finding.study_id, Finding.label, Finding.positive, func.count(),
                   func.max(Finding.score))
            .where(Finding.study_id.in_(ids), Finding.superseded.is_(False))
            .group_by(Finding.study_id, Finding.label, Finding.positive)):
        row = out[study_id]
        row["findings"] += count
        row["max_score"] = top if row["max_score"] is None else max(row["max_score"], top)
        if positive and label not in row["positive_labels"]:
            row["positive_labels"].append(label)
    return out


def _channel(source: str | None) -> str:
    """How an instance came: ``AE <title>`` (C-STORE), ``STOW-RS`` or ``folder``."""
    if source and source.startswith("scp:"):
        return f"AE {source[4:]}"
    if source == "stow":
        return "STOW-RS"
    return source or "folder"


def study_detail(session: Session, study_uid: str) -> dict[str, Any] | None:
    """Everything about one study, for its page; None when the study is not known."""
    study = session.scalars(select(Study).where(
        Study.study_instance_uid == study_uid)).first()
    if study is None:
        return None
    series = []
    for s, count in session.execute(
            select(Series, func.count(Instance.id))
            .outerjoin(Instance, Instance.series_id == Series.id)
            .where(Series.study_id == study.id).group_by(Series.id).order_by(Series.id)):
        series.append({"series_instance_uid": s.series_instance_uid, "modality": s.modality,
                       "tags": s.tags or {}, "instances": count})
    # Instances by revision and channel: the revisions table and the timeline's receipts.
    receipts = session.execute(
        select(Instance.study_revision, Instance.source, func.count(),
               func.min(Instance.received_at), func.max(Instance.received_at))
        .join(Series, Instance.series_id == Series.id).where(Series.study_id == study.id)
        .group_by(Instance.study_revision, Instance.source)).all()
    by_revision: dict[int, dict[str, Any]] = {}
    for rev, _source, n, first, last in receipts:
        row = by_revision.setdefault(rev, {"revision": rev, "instances": 0,
                                           "first_received_at": first,
                                           "last_received_at": last})
        row["instances"] += n
        row["first_received_at"] = min(row["first_received_at"], first)
        row["last_received_at"] = max(row["last_received_at"], last)
    revisions = [by_revision[rev] for rev in sorted(by_revision)]
    jobs = [{
        "job_id": j.id, "model": name, "model_version": version, "revision": j.study_revision,
        "state": j.state.value, "priority": j.priority.value, "attempts": j.attempts,
        "worker": j.worker, "created_at": j.created_at, "started_at": j.started_at,
        "finished_at": j.finished_at, "error_code": j.error_code, "error_detail": j.error_detail,
    } for j, name, version in session.execute(
        select(Job, Model.name, Model.version).join(Model, Job.model_id == Model.id)
        .where(Job.study_id == study.id).order_by(Job.id))]
    findings = [{
        "job_id": f.job_id, "series_instance_uid": f.series_instance_uid,
        "sop_instance_uid": f.sop_instance_uid, "model": name, "model_version": version,
        "label": f.label, "score": f.score, "threshold": f.threshold, "positive": f.positive,
        "superseded": f.superseded, "created_at": f.created_at,
    } for f, name, version in session.execute(
        select(Finding, Model.name, Model.version).join(Job, Finding.job_id == Job.id)
        .join(Model, Job.model_id == Model.id).where(Finding.study_id == study.id)
        .order_by(Finding.superseded, Finding.sop_instance_uid, Finding.label))]
    export_rows = list(session.scalars(
        select(Export).join(Job, Export.job_id == Job.id)
        .where(Job.study_id == study.id, Export.kind != "none").order_by(Export.id)))
    exports = [{
        "export_id": e.id, "job_id": e.job_id, "destination": e.destination, "kind": e.kind,
        "state": e.state.value, "attempts": e.attempts, "sent_at": e.sent_at,
        "error_code": e.error_code, "error_detail": e.error_detail,
    } for e in export_rows]
    return {
        "study_instance_uid": study.study_instance_uid,
        "state": derive_state(study.status, [JobState(j["state"]) for j in jobs
                                             if j["revision"] == study.dispatched_revision]),
        "status": study.status.value, "priority": study.priority.value,
        "revision": study.revision, "dispatched_revision": study.dispatched_revision,
        "first_received_at": study.first_received_at, "last_received_at": study.last_received_at,
        "routed_at": study.routed_at, "series": series, "revisions": revisions, "jobs": jobs,
        "findings": findings, "exports": exports,
        "timeline": _timeline(session, study, jobs, receipts, export_rows),
    }


def study_timeline(session: Session, study_uid: str) -> list[dict[str, Any]] | None:
    """The timeline alone (`lightbox explain`); None when the study is not known."""
    detail = study_detail(session, study_uid)
    return None if detail is None else detail["timeline"]


def _entry(at: datetime | None, kind: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"at": at, "kind": kind, "text": text, **extra}


def _timeline(session: Session, study: Study, jobs: list[dict[str, Any]],
              receipts: Sequence[Any], export_rows: list[Export]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for rev, source, n, first, _last in receipts:
        entries.append(_entry(first, "received", f"received {n} instance{'s' * (n != 1)} from "
                              f"{_channel(source)} (revision {rev})", revision=rev))
    job_models = {j["job_id"]: f"{j['model']} {j['model_version']}" for j in jobs}
    for j in jobs:
        entries.append(_entry(j["created_at"], "job_queued", f"job {j['job_id']} queued for "
                              f"model {job_models[j['job_id']]}, priority {j['priority']} "
                              f"(revision {j['revision']})", job_id=j["job_id"]))
    conditions = [Event.study_instance_uid == study.study_instance_uid]
    if job_models:
        conditions.append(Event.job_id.in_(list(job_models)))
    for event in session.scalars(select(Event).where(or_(*conditions)).order_by(Event.id)):
        text = _event_text(event, job_models)
        if text:
            entries.append(_entry(event.at, event.kind, text, job_id=event.job_id))
    for e in export_rows:
        what = f"{'SR' if e.kind == 'sr' else 'heatmap SC'} of job {e.job_id}"
        if e.state == ExportState.sent:
            entries.append(_entry(e.sent_at, "export_sent",
                                  f"{what} exported to {e.destination}", job_id=e.job_id))
        elif e.state == ExportState.dead:
            entries.append(_entry(e.not_before or e.created_at, "export_dead",
                                  f"{what} to {e.destination} dead after {e.attempts} "
                                  f"attempt(s): {e.error_code}: {e.error_detail}",
                                  job_id=e.job_id))
        else:
            entries.append(_entry(e.created_at, "export_pending",
                                  f"{what} waiting to be exported to {e.destination} "
                                  f"({e.attempts} attempt(s) so far)", job_id=e.job_id))
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    # Steps of one pass are stamped microseconds apart, not always in causal order (a job's
    # created_at is taken before its routing event is written): within a second, the order
    # in which things happen to a study decides.
    entries.sort(key=lambda e: ((e["at"] or epoch).replace(microsecond=0),
                                _RANK.get(e["kind"], 5), e["at"] or epoch))
    return entries


_RANK = {"received": 0, "file_quarantined": 1, "study_reopened": 1, "study_unrouted": 2,
         "study_dispatched": 2, "job_queued": 3, "job_started": 4, "inference_batches": 5,
         "job_succeeded": 6, "job_failed": 6, "export_sent": 8, "export_dead": 8}


def _event_text(event: Event, job_models: dict[int, str]) -> str | None:
    d = event.detail or {}
    job = f"job {event.job_id}"
    match event.kind:
        case "study_unrouted":
            return f"ready; unrouted (revision {d.get('revision')}): {d.get('reason')}"
        case "study_dispatched":
            return (f"ready; routed to model(s) {', '.join(d.get('models', []))} "
                    f"(revision {d.get('revision')})")
        case "study_reopened":
            return (f"a late instance reopened the study as revision {d.get('revision')}: "
                    "findings of earlier revisions are superseded when it is processed")
        case "cstore_high_priority":
            return "the sender asked for high priority (C-STORE)"
        case "file_quarantined":
            return f"a file of this study was quarantined: {d.get('reason')} ({d.get('code')})"
        case "job_started":
            return f"{job} claimed by worker {d.get('worker')} (attempt {d.get('attempt')})"
        case "inference_batches":
            return f"{job} ran in runtime batch(es) {d.get('batches')}"
        case "job_succeeded":
            return f"{job} succeeded ({job_models.get(event.job_id or 0, '')})"
        case "job_failed":
            end = "dead" if d.get("state") == "dead" else "will retry"
            return f"{job} failed: {d.get('code')} (attempt {d.get('attempt')}); {end}"
        case "job_heartbeat_lost":
            return (f"{job}: worker {d.get('worker')} stopped sending heartbeats "
                    f"(attempt {d.get('attempt')}); {d.get('state')}")
        case "job_retried":
            return f"{job} retried by {d.get('by')} (was {d.get('previous')})"
        case "job_cancelled":
            return f"{job} cancelled"
        case "api_audit":
            return None  # the transition's own event says it (with who)
    return f"{event.kind}: {d}" if d else event.kind


# -- findings and jobs ------------------------------------------------------------------------------

@dataclass
class FindingFilters:
    study_uid: str | None = None
    label: str | None = None
    min_score: float | None = None
    since: datetime | None = None
    include_superseded: bool = False


FINDING_KEYS = ("finding_id", "study_instance_uid", "series_instance_uid", "sop_instance_uid",
                "model", "model_version", "label", "score", "threshold", "positive",
                "superseded", "created_at", "job_id")


def _findings_query(filters: FindingFilters):  # type: ignore[no-untyped-def]
    query = (
        select(Finding.id, Study.study_instance_uid, Finding.series_instance_uid,
               Finding.sop_instance_uid, Model.name, Model.version, Finding.label, Finding.score,
               Finding.threshold, Finding.positive, Finding.superseded, Finding.created_at,
               Finding.job_id)
        .join(Job, Finding.job_id == Job.id).join(Model, Job.model_id == Model.id)
        .join(Study, Finding.study_id == Study.id)
    )
    if filters.study_uid:
        query = query.where(Study.study_instance_uid == filters.study_uid)
    if filters.label:
        query = query.where(Finding.label == filters.label)
    if filters.min_score is not None:
        query = query.where(Finding.score >= filters.min_score)
    if filters.since is not None:
        query = query.where(Finding.created_at >= filters.since)
    if not filters.include_superseded:
        query = query.where(Finding.superseded.is_(False))
    return query


def list_findings(session: Session, filters: FindingFilters, *, after: str | None = None,
                  limit: int = 100) -> Page:
    """Findings newest first (by id), one keyset page."""
    limit = max(1, min(limit, MAX_PAGE))
    query = _findings_query(filters)
    if after:
        query = query.where(Finding.id < _id_cursor(after))
    rows = session.execute(query.order_by(Finding.id.desc()).limit(limit + 1)).all()
    items = [dict(zip(FINDING_KEYS, r, strict=True)) for r in rows[:limit]]
    cursor = encode_cursor(items[-1]["finding_id"]) if len(rows) > limit else None
    return Page(items, cursor)


def iter_findings(session: Session, filters: FindingFilters,
                  chunk: int = 1000) -> Iterator[dict[str, Any]]:
    """Every matching finding, newest first, fetched in chunks (for a streamed CSV)."""
    last: int | None = None
    while True:
        query = _findings_query(filters)
        if last is not None:
            query = query.where(Finding.id < last)
        rows = session.execute(query.order_by(Finding.id.desc()).limit(chunk)).all()
        for row in rows:
            yield dict(zip(FINDING_KEYS, row, strict=True))
        if len(rows) < chunk:
            return
        last = rows[-1][0]


def list_jobs(session: Session, *, state: str | None = None, after: str | None = None,
              limit: int = 100) -> Page:
    """Jobs newest first (by id), with their study, model, attempts and last error."""
    limit = max(1, min(limit, MAX_PAGE))
    query = (select(Job, Study.study_instance_uid, Model.name, Model.version)
             .join(Study, Job.study_id == Study.id).join(Model, Job.model_id == Model.id))
    if state:
        query = query.where(Job.state == JobState(state))
    if after:
        query = query.where(Job.id < _id_cursor(after))
    rows = session.execute(query.order_by(Job.id.desc()).limit(limit + 1)).all()
    items = [job_row(j, uid, name, version) for j, uid, name, version in rows[:limit]]
    cursor = encode_cursor(items[-1]["job_id"]) if len(rows) > limit else None
    return Page(items, cursor)


def job_row(j: Job, study_uid: str, model: str, version: str) -> dict[str, Any]:
    return {"job_id": j.id, "study_instance_uid": study_uid, "model": model,
            "model_version": version, "revision": j.study_revision, "state": j.state.value,
            "priority": j.priority.value, "attempts": j.attempts, "worker": j.worker,
            "created_at": j.created_at, "started_at": j.started_at,
            "finished_at": j.finished_at, "error_code": j.error_code,
            "error_detail": j.error_detail}


def get_job(session: Session, job_id: int) -> dict[str, Any] | None:
    row = session.execute(
        select(Job, Study.study_instance_uid, Model.name, Model.version)
        .join(Study, Job.study_id == Study.id).join(Model, Job.model_id == Model.id)
        .where(Job.id == job_id)).first()
    return None if row is None else job_row(*row)


def heatmap_source(session: Session, job_id: int, sop_instance_uid: str) -> str | None:
    """The stored file of the image a heatmap belongs to (None: unknown or deleted)."""
    return session.scalar(
        select(Instance.stored_path)
        .join(Finding, and_(Finding.sop_instance_uid == Instance.sop_instance_uid,
                            Finding.job_id == job_id))
        .where(Instance.sop_instance_uid == sop_instance_uid).limit(1))


# -- models and the overview ------------------------------------------------------------------------

def model_row(m: Model, *, full: bool = False) -> dict[str, Any]:
    manifest = m.manifest or {}
    row = {"name": m.name, "version": m.version, "stage": m.stage.value,
           "registered_at": m.registered_at, "architecture": manifest.get("architecture"),
           "labels": manifest.get("labels", []), "thresholds": manifest.get("thresholds", {}),
           "metrics": manifest.get("metrics", {}),
           "plots": manifest.get("plots", [])}
    if full:
        row.update({"threshold_policy": manifest.get("threshold_policy"),
                    "confusion": manifest.get("confusion", {}),
                    "training_data": manifest.get("training_data", {}),
                    "parity": manifest.get("parity", {}),
                    "variants": manifest.get("variants", {}),
                    "created_at": manifest.get("created_at"), "bundle_path": m.bundle_path})
    return row


def overview(session: Session, *, now: datetime | None = None) -> dict[str, Any]:
    """The dashboard's first page: jobs by state and priority, throughput per minute over the
    last hour, workers, quarantined files, exports pending and dead."""
    now = now or datetime.now(timezone.utc)
    jobs = {s.value: 0 for s in JobState}
    for state_, count in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        jobs[state_.value] = count
    waiting = {p.value: 0 for p in Priority}
    for priority, count in session.execute(
            select(Job.priority, func.count()).where(Job.state == JobState.queued)
            .group_by(Job.priority)):
        waiting[priority.value] = count
    since = now - timedelta(hours=1)
    minutes = [0] * 60
    for (at,) in session.execute(select(Finding.created_at).where(
            Finding.created_at >= since, Finding.superseded.is_(False))
            .group_by(Finding.job_id, Finding.sop_instance_uid, Finding.created_at)):
        index = int((at - since).total_seconds() // 60)
        if 0 <= index < 60:
            minutes[index] += 1
    workers = [{"hostname": w.hostname, "runtime": w.runtime, "pid": w.pid,
                "started_at": w.started_at, "last_seen_at": w.last_seen_at}
               for w in session.scalars(select(WorkerNode).order_by(
                   WorkerNode.last_seen_at.desc()).limit(50))]
    exports = {s.value: 0 for s in ExportState}
    for export_state, count in session.execute(
            select(Export.state, func.count()).where(Export.kind != "none")
            .group_by(Export.state)):
        exports[export_state.value] = count
    quarantined = [{"id": q.id, "at": q.at, "code": q.reason_code, "reason": q.reason}
                   for q in session.scalars(select(QuarantinedFile)
                                            .order_by(QuarantinedFile.id.desc()).limit(10))]
    return {
        "jobs": jobs, "queued_by_priority": waiting,
        "throughput": {"since": since, "minutes": minutes, "images": sum(minutes)},
        "workers": workers, "exports": exports,
        "quarantined_total": session.scalar(select(func.count()).select_from(QuarantinedFile)),
        "quarantined": quarantined,
    }
