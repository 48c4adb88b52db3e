"""From ready studies to job messages.

Jobs are rows first: a job is inserted as ``queued`` with ``enqueued_at`` NULL and committed;
only then is its Celery message sent, and ``enqueued_at`` set. A crash between the two leaves a
queued, unsent job that the next pass sends (the transactional outbox). A message sent twice
is harmless: the worker claims only a ``queued`` job and its findings write is idempotent.

Each message's Celery task id carries its job id (:func:`lightbox.task_names.job_task_id`), which is
how :mod:`scheduler.scheduling.reconcile` finds jobs whose message Redis lost.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from celery import Celery
from sqlalchemy import Select, case, func, select
from sqlalchemy.orm import Session, selectinload

from db import jobs as job_states
from db.locking import skip_locked
from db.model_registry import production_model
from db.models import Event, Instance, Job, JobState, Priority, Series, Study, StudyStatus
from db.session import session_scope
from db.upsert import insert_ignore
from db.volume_tables import JobSeries
from lightbox.settings import Settings
from lightbox.task_names import PRIORITY_ROUTINE, PRIORITY_STAT, PROCESS_JOB, job_task_id
from scheduler.scheduling.route import Rule, route_study, unmatched_reason

log = logging.getLogger(__name__)
BATCH = 200


@dataclass
class PassReport:
    studies_dispatched: int = 0
    studies_unrouted: int = 0
    jobs_created: int = 0
    jobs_sent: int = 0
    jobs_requeued: int = 0
    jobs_stale: int = 0
    jobs_dead: int = 0
    jobs_lost: int = 0
    jobs_escalated: int = 0
    pixels_deleted: int = 0
    reservations_cleared: int = 0

    def __bool__(self) -> bool:
        return any(vars(self).values())


def _ready(session: Session, quiet_seconds: float) -> list[Study]:
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=quiet_seconds)
    query = (
        select(Study)
        .where(Study.status == StudyStatus.receiving, Study.last_received_at <= cutoff)
        .order_by(Study.last_received_at)
        .limit(BATCH)
        .options(selectinload(Study.series))
    )
    return list(session.scalars(skip_locked(session, query, of=Study)))


def _series_tags(session: Session, study: Study) -> list[dict[str, object]]:
    """Each series' routing tags plus pseudo-tags: ``CallingAETitle`` (the AE titles that sent
    it, SCP), ``SeriesInstanceUID``, ``Instances`` and ``Slices`` (instances × NumberOfFrames)
    for series-level rules."""
    senders: dict[int, list[str]] = {}
    for series_id, source in session.execute(
            select(Instance.series_id, Instance.source).distinct()
            .join(Series, Instance.series_id == Series.id).where(Series.study_id == study.id)):
        if source and source.startswith("scp:"):
            senders.setdefault(series_id, []).append(source[4:])
    counts = dict(session.execute(
        select(Instance.series_id, func.count(Instance.id))
        .join(Series, Instance.series_id == Series.id).where(Series.study_id == study.id)
        .group_by(Instance.series_id)).all())
    out = []
    for s in study.series:
        tags = dict(s.tags or {})
        instances = int(counts.get(s.id, 0))
        try:
            frames = max(1, int(str(tags.get("NumberOfFrames") or 1)))
        except ValueError:
            frames = 1
        out.append({**tags, "CallingAETitle": senders.get(s.id, []),
                    "SeriesInstanceUID": s.series_instance_uid, "Instances": instances,
                    "Slices": instances * frames})
    return out


def send(app: Celery, job_id: int, stat: bool, producer: Any = None) -> None:
    """One job message; STAT jobs use the first priority sub-queue. Pass one ``producer`` for a
    batch (``app.producer_or_acquire()``): a connection per message costs more than the send."""
    app.send_task(PROCESS_JOB, args=[job_id], task_id=job_task_id(job_id, uuid.uuid4().hex[:12]),
                  priority=PRIORITY_STAT if stat else PRIORITY_ROUTINE, producer=producer)


def dispatch_ready(settings: Settings, rules: list[Rule], report: PassReport) -> None:
    """Route quiet studies and create their jobs (committed, not yet sent)."""
    with session_scope(settings.sqlalchemy_url) as session:
        now = datetime.now(timezone.utc)
        for study in _ready(session, settings.quiet_seconds):
            series_tags = _series_tags(session, study)
            routes = route_study(rules, series_tags)
            models = [(r, production_model(session, r.model)) for r in routes]
            missing = [r.model for r, m in models if m is None]
            study.routed_at = now
            if not routes or missing:
                study.status = StudyStatus.unrouted
                reason = unmatched_reason(rules, series_tags) if not routes else (
                    f"no production version of model(s): {', '.join(missing)}")
                session.add(Event(kind="study_unrouted", study_instance_uid=study.study_instance_uid,
                                  detail={"reason": reason, "revision": study.revision}))
                report.studies_unrouted += 1
                continue
            insert_ignore(session, Job, [
                {"study_id": study.id, "study_revision": study.revision, "model_id": m.id,
                 "priority": r.priority, "state": JobState.queued, "created_at": now}
                for r, m in models if m is not None
            ])
            _record_series(session, study, [(r, m.id) for r, m in models if m is not None])
            study.status, study.dispatched_revision = StudyStatus.dispatched, study.revision
            study.priority = (Priority.stat if any(r.priority == Priority.stat for r in routes)
                              else Priority.routine)
            session.add(Event(kind="study_dispatched", study_instance_uid=study.study_instance_uid,
                              detail={"revision": study.revision,
                                      "models": [r.model for r in routes]}))
            report.studies_dispatched += 1
            report.jobs_created += len(models)


def claim_and_send(settings: Settings, app: Celery, query: Select[int, Priority],
                   mark: Callable[[Session, list[int]], object], *, stat: bool = False) -> int:
    """Claim the jobs ``query`` selects (``(id, priority)``, at most :data:`BATCH` a time,
    skipping rows another scheduler holds), send one message each and ``mark`` them in the
    same transaction, until the query selects none. ``stat``: send every one at STAT
    priority (else each at its own). Returns how many were sent.

    A crash after a send and before the commit leaves the job unmarked, so it is sent again:
    a duplicate message is harmless, a lost one is not."""
    sent = 0
    while True:
        with session_scope(settings.sqlalchemy_url) as session:
            rows = list(session.execute(skip_locked(session, query)))
            if not rows:
                return sent
            with app.producer_or_acquire() as producer:
                for job_id, priority in rows:
                    send(app, job_id, stat or priority == Priority.stat, producer)
            mark(session, [job_id for job_id, _ in rows])
            sent += len(rows)
def _record_series(session: Session, study: Study, routes: list[tuple[Any, int]]) -> None:
    """The series each series-level route chose, on its job (one row per job, kept on redo)."""
    chosen = {model_id: r for r, model_id in routes if r.series_instance_uid}
    if not chosen:
        return
    session.flush()
    jobs = session.execute(select(Job.id, Job.model_id).where(
        Job.study_id == study.id, Job.study_revision == study.revision,
        Job.model_id.in_(list(chosen))))
    insert_ignore(session, JobSeries, [
        {"job_id": job_id, "series_instance_uid": chosen[model_id].series_instance_uid,
         "rule": chosen[model_id].rule[:64]} for job_id, model_id in jobs])


def send_pending(settings: Settings, app: Celery, report: PassReport) -> None:
    """Send every queued job that has no message yet (new, retried, or lost in a crash)."""
    with session_scope(settings.sqlalchemy_url) as session:
        report.jobs_requeued += job_states.requeue_due(session)
    report.jobs_sent += claim_and_send(
        settings, app,
        select(Job.id, Job.priority)
        .where(Job.state == JobState.queued, Job.enqueued_at.is_(None))
        .order_by(case((Job.priority == Priority.stat, 0), else_=1), Job.id)
        .limit(BATCH),
        job_states.mark_enqueued)
