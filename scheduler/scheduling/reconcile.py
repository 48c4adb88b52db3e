"""Make the queue agree with the database when something outside it failed.

Three checks, each cheap enough to run every few seconds and safe to run in several
schedulers at once (rows are claimed with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL):

- **stale heartbeats**: a running job whose worker stopped beating (SIGKILL, host lost) goes
  back to queued with its attempt counted, or dead when it has used its attempts;
- **lost messages**: a queued job whose message was sent more than a grace period ago but is
  neither waiting in a Redis priority list nor freshly reserved by a worker (kombu's
  ``unacked`` hash, with the reservation time in ``unacked_index``) is marked unsent, and the
  outbox sends it again. This covers Redis restarted empty, a flushed database, and messages
  reserved (prefetched) by a worker that was killed before it claimed them: a reservation
  older than the heartbeat timeout whose job is still queued is treated as stranded. A
  message that exists twice is harmless (only a queued job can be claimed); a lost one is
  not, so when in doubt, resend;
- **finished reservations**: a message reserved by a worker that was killed (-9) before it
  acknowledged stays in kombu's ``unacked`` hash until the visibility timeout (an hour by
  default), to be redelivered for nothing. A reservation older than the heartbeat timeout
  whose job is finished (succeeded, dead, cancelled) is removed at once;
- **aging**: a routine job whose message has waited longer than ``stat_aging_seconds`` is sent
  once more at STAT priority, so a steady STAT load cannot starve routine work.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import cast

from celery import Celery
from sqlalchemy import select

from db import jobs as job_states
from db.models import Job, JobState, Priority
from db.session import session_scope
from lightbox.redis_server import broker_url, redis_client
from lightbox.settings import Settings
from lightbox.task_names import job_id_of_task, queue_keys
from scheduler.scheduling.dispatch import BATCH, PassReport, claim_and_send

log = logging.getLogger(__name__)
UNACKED_KEY = "unacked"  # kombu's Redis transport defaults
UNACKED_INDEX_KEY = "unacked_index"


def _task_id(payload: object) -> str | None:
    if isinstance(payload, list) and payload:  # unacked entries: [message, exchange, key]
        payload = payload[0]
    if isinstance(payload, dict):
        headers = payload.get("headers") or {}
        task_id = headers.get("id") if isinstance(headers, dict) else None
        return str(task_id) if task_id else None
    return None


def jobs_with_messages(url: str, reserved_limit_seconds: float | None = None) -> set[int]:
    """Job ids that have a message in Redis, waiting or reserved by a worker (reserved less
    than ``reserved_limit_seconds`` ago, when given). Read in one MULTI, so a message moving
    from a list to ``unacked`` is not missed between two reads."""
    client = redis_client(url)
    pipe = client.pipeline(transaction=True)
    for key in queue_keys():
        pipe.lrange(key, 0, -1)
    pipe.hgetall(UNACKED_KEY)
    pipe.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)
    *lists, unacked, index = pipe.execute()
    raws = [item for batch in lists for item in batch]
    reserved_at = dict(index)
    oldest = None if reserved_limit_seconds is None else time.time() - reserved_limit_seconds
    for tag, raw in unacked.items():
        if oldest is None or reserved_at.get(tag, time.time()) >= oldest:
            raws.append(raw)
    found: set[int] = set()
    for raw in raws:
        try:
            task_id = _task_id(json.loads(raw))
        except (ValueError, TypeError):
            continue  # not a kombu message: nothing of ours
        job_id = job_id_of_task(task_id) if task_id else None
        if job_id is not None:
            found.add(job_id)
    return found


def requeue_stale(settings: Settings, report: PassReport) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        requeued, dead = job_states.requeue_stale(
            session, timeout_seconds=settings.heartbeat_timeout_seconds,
            max_attempts=settings.job_max_attempts)
        locked = job_states.stale_running(session,
                                          timeout_seconds=settings.heartbeat_timeout_seconds)
    if locked:
        log.warning("heartbeat lost but row locked (worker frozen inside a transaction?): "
                    "job(s) %s, requeued once its session times out "
                    "(LIGHTBOX_WORKER_DB_TIMEOUT_SECONDS)", locked)
    report.jobs_stale += requeued
    report.jobs_dead += dead
    if requeued or dead:
        log.warning("heartbeat lost: %d job(s) requeued, %d dead", requeued, dead)


def resend_lost(settings: Settings, report: PassReport) -> None:
    """Mark queued jobs whose message is nowhere in Redis as unsent (see module docstring)."""
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=settings.lost_message_grace_seconds)
    with session_scope(settings.sqlalchemy_url) as session:
        candidates = set(session.scalars(
            select(Job.id).where(Job.state == JobState.queued, Job.enqueued_at.is_not(None),
                                 Job.enqueued_at < cutoff)))
    if not candidates:
        return
    present = jobs_with_messages(broker_url(settings, start=False),
                                 reserved_limit_seconds=settings.heartbeat_timeout_seconds)
    lost = sorted(candidates - present)
    if not lost:
        return
    with session_scope(settings.sqlalchemy_url) as session:
        count = job_states.mark_unsent(session, lost)
    report.jobs_lost += count
    log.warning("%d queued job(s) had no message in Redis; resending", count)


def clear_finished_reservations(settings: Settings, report: PassReport) -> None:
    """Remove ``unacked`` reservations older than the heartbeat timeout whose job is finished
    (see module docstring). A live worker holds a reservation only while its job runs, and a
    finished job's message would only be dropped again if redelivered, so nothing is lost."""
    client = redis_client(broker_url(settings, start=False))
    oldest = time.time() - settings.heartbeat_timeout_seconds
    scored = cast(list[tuple[bytes, float]], client.zrangebyscore(
        UNACKED_INDEX_KEY, "-inf", oldest, withscores=True))
    tags = [tag for tag, _ in scored]
    if not tags:
        return
    by_job: dict[int, list[bytes]] = {}
    for tag, raw in zip(tags, client.hmget(UNACKED_KEY, tags), strict=True):
        if raw is None:
            continue
        try:
            task_id = _task_id(json.loads(raw))
        except (ValueError, TypeError):
            continue
        job_id = job_id_of_task(task_id) if task_id else None
        if job_id is not None:
            by_job.setdefault(job_id, []).append(tag)
    if not by_job:
        return
    with session_scope(settings.sqlalchemy_url) as session:
        finished = set(session.scalars(select(Job.id).where(
            Job.id.in_(list(by_job)),
            Job.state.in_([JobState.succeeded, JobState.dead, JobState.cancelled]))))
    stale = [tag for job_id in finished for tag in by_job[job_id]]
    if not stale:
        return
    pipe = client.pipeline(transaction=True)
    pipe.hdel(UNACKED_KEY, *stale)
    pipe.zrem(UNACKED_INDEX_KEY, *stale)
    pipe.execute()
    report.reservations_cleared += len(stale)
    log.warning("%d reservation(s) of finished jobs left by lost workers removed from Redis",
                len(stale))


def escalate_waiting(settings: Settings, app: Celery, report: PassReport) -> None:
    """Send routine jobs that waited past the aging limit again, at STAT priority."""
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=settings.stat_aging_seconds)
    report.jobs_escalated += claim_and_send(
        settings, app,
        select(Job.id, Job.priority)
        .where(Job.state == JobState.queued, Job.priority == Priority.routine,
               Job.enqueued_at < cutoff, Job.escalated_at.is_(None))
        .order_by(Job.enqueued_at, Job.id).limit(BATCH),
        job_states.mark_escalated, stat=True)
