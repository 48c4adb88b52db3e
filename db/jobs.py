"""Every job state transition, in one place.

    queued ──claim──▶ running ──succeed──▶ succeeded
      ▲  ▲              │ │ └──fail (retryable, attempts left)──▶ failed ──requeue_due──▶ queued
      │  │              │ └──fail (permanent or attempts used)──▶ dead
      │  └──requeue_stale (heartbeat older than the timeout, attempts left)
      │                 └──requeue_stale (attempts used)──────────▶ dead
      └──── retry / requeue_dead (operator) ◀── failed, dead, cancelled
    queued/failed/running ──cancel──▶ cancelled

Only a ``queued`` job can be claimed, so a duplicate Celery message (resent after a Redis
restart, escalated to STAT, redelivered after a visibility timeout) finds the job already
running or finished and is dropped: it can never run a job twice at once. A running job whose
worker died is found by its stale heartbeat, not by message redelivery.

Each function works inside the caller's transaction; the caller commits.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.locking import skip_locked
from db.models import Event, Job, JobState

BACKOFF_BASE_S = 5.0
BACKOFF_CAP_S = 600.0
CLAIMABLE = (JobState.queued,)
RETRYABLE_BY_OPERATOR = (JobState.failed, JobState.dead, JobState.cancelled)
STALE_BATCH = 500


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _event(session: Session, job: Job, kind: str, **detail: object) -> None:
    session.add(Event(kind=kind, job_id=job.id, detail={"state": job.state.value, **detail}))


def backoff_seconds(attempts: int) -> float:
    """Exponential backoff with jitter ("full jitter" on the upper half)."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1))
    return random.uniform(ceiling / 2, ceiling)


def claim(session: Session, job_id: int, worker: str) -> Job | None:
    """Lock the job and mark it running; None unless it is ``queued`` (finished, cancelled,
    waiting to retry, or already running elsewhere: a duplicate message is dropped)."""
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
    """A cancelled job stays cancelled: the operator's decision outranks a late result."""
    if job.state == JobState.cancelled:
        return
    job.state, job.finished_at = JobState.succeeded, _now()
    _event(session, job, "job_succeeded", attempt=job.attempts)


def fail(session: Session, job: Job, *, code: str, detail: str, retryable: bool,
         max_attempts: int) -> None:
    if job.state == JobState.cancelled:
        return
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
        .values(state=JobState.queued, enqueued_at=None, escalated_at=None)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def requeue_stale(session: Session, *, timeout_seconds: float, max_attempts: int) -> tuple[int, int]:
    """Running jobs whose heartbeat is older than ``timeout_seconds`` lost their worker (killed,
    host down, partitioned from the database). Their attempt was counted by :func:`claim`; they
    go back to queued (the outbox resends them) or, with no attempts left, dead with the reason.
    Returns (requeued, dead)."""
    cutoff = _now() - timedelta(seconds=timeout_seconds)
    stale = session.scalars(skip_locked(session, (
        select(Job).where(Job.state == JobState.running, Job.heartbeat_at < cutoff)
        .order_by(Job.id).limit(STALE_BATCH))))
    requeued = dead = 0
    for job in stale:
        detail = (f"worker {job.worker} stopped sending heartbeats (last "
                  f"{job.heartbeat_at:%Y-%m-%dT%H:%M:%SZ}) during attempt {job.attempts}")
        job.error_code, job.error_detail = "heartbeat_lost", detail
        if job.attempts >= max_attempts:
            job.state, job.finished_at = JobState.dead, _now()
            dead += 1
        else:
            job.state, job.enqueued_at, job.escalated_at = JobState.queued, None, None
            requeued += 1
        _event(session, job, "job_heartbeat_lost", attempt=job.attempts, worker=job.worker)
    return requeued, dead


def stale_running(session: Session, *, timeout_seconds: float) -> list[int]:
    """Running jobs with a stale heartbeat, locked or not. After :func:`requeue_stale` in the
    same transaction, what is left is locked by another session: on PostgreSQL, a worker
    frozen inside its transaction (its session ends at its ``idle_in_transaction`` timeout)."""
    cutoff = _now() - timedelta(seconds=timeout_seconds)
    return list(session.scalars(select(Job.id).where(
        Job.state == JobState.running, Job.heartbeat_at < cutoff).order_by(Job.id)
        .limit(STALE_BATCH)))


def mark_enqueued(session: Session, job_ids: list[int]) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(enqueued_at=_now()))


def mark_unsent(session: Session, job_ids: list[int]) -> int:
    """Queued jobs whose message was lost (Redis restarted empty): the outbox sends them again."""
    if not job_ids:
        return 0
    result = session.execute(
        update(Job).where(Job.id.in_(job_ids), Job.state == JobState.queued)
        .values(enqueued_at=None))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def mark_escalated(session: Session, job_ids: list[int]) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(escalated_at=_now()))


def retry(session: Session, job: Job, *, by: str = "operator") -> bool:
    """Give a failed, dead or cancelled job a fresh set of attempts. False if it cannot be."""
    if job.state not in RETRYABLE_BY_OPERATOR:
        return False
    previous = job.state.value
    job.state, job.attempts = JobState.queued, 0
    job.enqueued_at = job.escalated_at = job.not_before = job.finished_at = None
    _event(session, job, "job_retried", previous=previous, by=by)
    return True


def cancel(session: Session, job: Job) -> bool:
    """Cancel a job that has not finished. A running attempt is not interrupted; its result is
    discarded by :func:`succeed` (the state stays ``cancelled``)."""
    if job.state.terminal:
        return False
    job.state, job.finished_at = JobState.cancelled, _now()
    _event(session, job, "job_cancelled")
    return True
