"""Every job state transition, in one place.

    queued ──claim──▶ running ──succeed──▶ succeeded
      ▲                 │ └──fail (retryable, attempts left)──▶ failed ──requeue_due──▶ queued
      │                 └──fail (permanent or attempts used)──▶ dead
      └──── redelivered message of a running job (worker died) is claimed again
    queued/failed/running ──cancel──▶ cancelled

Each function works inside the caller's transaction; the caller commits.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import Event, Job, JobState

BACKOFF_BASE_S = 5.0
BACKOFF_CAP_S = 600.0
CLAIMABLE = (JobState.queued, JobState.running)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _event(session: Session, job: Job, kind: str, **detail: object) -> None:
    session.add(Event(kind=kind, job_id=job.id, detail={"state": job.state.value, **detail}))


def backoff_seconds(attempts: int) -> float:
    """Exponential backoff with jitter ("full jitter" on the upper half)."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1))
    return random.uniform(ceiling / 2, ceiling)


def claim(session: Session, job_id: int, worker: str) -> Job | None:
    """Lock the job and mark it running; None if it is finished, cancelled or waiting to retry."""
    job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
    if job is None or job.state not in CLAIMABLE:
        return None
    now = _now()
    job.state, job.worker = JobState.running, worker
    job.attempts += 1
    job.started_at = job.heartbeat_at = now
    job.error_code = job.error_detail = None
    _event(session, job, "job_started", attempt=job.attempts, worker=worker)
    return job


def heartbeat(session: Session, job_id: int) -> None:
    session.execute(
        update(Job).where(Job.id == job_id, Job.state == JobState.running).values(heartbeat_at=_now())
    )


def succeed(session: Session, job: Job) -> None:
    job.state, job.finished_at = JobState.succeeded, _now()
    _event(session, job, "job_succeeded", attempt=job.attempts)


def fail(session: Session, job: Job, *, code: str, detail: str, retryable: bool,
         max_attempts: int) -> None:
    job.error_code, job.error_detail = code, detail[:4000]
    job.finished_at = _now()
    if retryable and job.attempts < max_attempts:
        job.state = JobState.failed
        job.not_before = job.finished_at + timedelta(seconds=backoff_seconds(job.attempts))
    else:
        job.state = JobState.dead
    _event(session, job, "job_failed", code=code, attempt=job.attempts)


def requeue_due(session: Session) -> int:
    """Failed jobs whose backoff has passed go back to queued (the outbox sends them)."""
    result = session.execute(
        update(Job)
        .where(Job.state == JobState.failed, Job.not_before <= _now())
        .values(state=JobState.queued, enqueued_at=None)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def mark_enqueued(session: Session, job_ids: list[int]) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(enqueued_at=_now()))


def cancel(session: Session, job: Job) -> bool:
    if job.state.terminal:
        return False
    job.state, job.finished_at = JobState.cancelled, _now()
    _event(session, job, "job_cancelled")
    return True
