"""Fault injection on PostgreSQL, with real scheduler and worker processes and this suite's own
PostgreSQL and Redis servers (so they can be killed). Every scenario runs a batch of studies
and ends with the same scoreboard: studies sent = studies finished = studies expected, and
findings found = findings expected (one per image), no more, no fewer, one job per study.

Stalls are made with a table lock, not with sleeps: while the test holds ``LOCK TABLE
findings IN EXCLUSIVE MODE``, every worker is stuck inside its findings transaction with its
job ``running``, which is exactly the moment to kill something.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select

from db.models import Event, Job, JobState
from db.session import session_scope
from lightbox.task_names import queue_keys
from tests.conftest import wait_for
from tests.faults.conftest import Cluster

pytestmark = pytest.mark.postgres


@contextmanager
def findings_locked(cluster: Cluster) -> Iterator[sa.Connection]:
    engine = sa.create_engine(cluster.url)
    conn = engine.connect()
    tx = conn.begin()
    conn.execute(sa.text("LOCK TABLE findings IN EXCLUSIVE MODE"))
    try:
        yield conn
    finally:
        try:
            tx.rollback()
            conn.close()
        except sa.exc.DBAPIError:
            pass  # the server was restarted under the lock
        engine.dispose()


def _count(cluster: Cluster, *where: object) -> int:
    with session_scope(cluster.url) as session:
        return int(session.scalar(select(func.count()).select_from(Job).where(*where)) or 0)


def _queued_in_redis(cluster: Cluster) -> int:
    client = cluster.servers.redis.client()
    return int(sum(client.llen(k) for k in queue_keys()))


def test_worker_sigkilled_mid_batch(cluster: Cluster) -> None:
    """Two workers are stuck writing findings; one is SIGKILLed. Its job's heartbeat goes
    stale, the scheduler requeues it with the attempt counted, and the other worker finishes
    every job."""
    cluster.add_studies(12, seed=1)
    with findings_locked(cluster):
        doomed = cluster.spawn("worker", "worker-doomed")
        cluster.spawn("worker", "worker-survivor")
        cluster.spawn("scheduler", "scheduler")
        # Workers name themselves "host:pid" on the jobs they claim.
        wait_for(lambda: _count(cluster, Job.state == JobState.running,
                                Job.worker.like(f"%:{doomed.pid}")) >= 1, timeout=120,
                 what="the doomed worker inside a job")
        cluster.kill(doomed)
    cluster.wait_finished()
    board = cluster.scoreboard("worker SIGKILL mid-batch")
    assert board["jobs_succeeded"] == 12
    with session_scope(cluster.url) as session:
        lost = session.scalars(select(Event).where(Event.kind == "job_heartbeat_lost")).all()
    assert len(lost) >= 1  # the killed worker's job was found by its heartbeat
    assert max(attempts for *_, attempts in cluster.jobs()) >= 2


def test_redis_stopped_and_started_empty(cluster: Cluster) -> None:
    """Every message is in Redis when Redis dies and comes back empty; the scheduler finds the
    queued jobs with no message and sends them again."""
    cluster.add_studies(12, seed=2)
    with findings_locked(cluster):
        cluster.spawn("worker", "worker")
        cluster.spawn("scheduler", "scheduler")
        wait_for(lambda: _count(cluster, Job.enqueued_at.is_not(None)) == 12
                 and _count(cluster, Job.state == JobState.running) >= 1, timeout=120,
                 what="all twelve jobs sent, one running")
        waiting = _count(cluster, Job.state == JobState.queued)
        assert waiting >= 1  # messages of queued jobs are in Redis (waiting or reserved)
        cluster.servers.redis.kill()
        cluster.servers.redis.start()
        assert _queued_in_redis(cluster) == 0  # the queue is lost
    cluster.wait_finished()
    cluster.scoreboard("Redis stopped and started empty")
    with session_scope(cluster.url) as session:
        assert _count(cluster, Job.state == JobState.succeeded) == 12
        assert session.scalar(select(func.count()).select_from(Event)
                              .where(Event.kind == "job_started")) >= 12


def test_postgres_restarted_while_workers_write(cluster: Cluster) -> None:
    """PostgreSQL crashes (immediate stop: connections cut, no checkpoint) while two workers
    are inside their findings transactions and the scheduler is dispatching."""
    cluster.add_studies(24, seed=3)
    with findings_locked(cluster):
        cluster.spawn("worker", "worker-1")
        cluster.spawn("worker", "worker-2")
        cluster.spawn("scheduler", "scheduler")
        wait_for(lambda: _count(cluster, Job.state == JobState.running) >= 2, timeout=120,
                 what="both workers writing")
        cluster.servers.postgres.restart("immediate")
    cluster.wait_finished()
    board = cluster.scoreboard("PostgreSQL restarted while workers write")
    assert board["jobs_succeeded"] == 24


def test_scheduler_killed_in_the_middle_of_sending(cluster: Cluster) -> None:
    """The scheduler is SIGKILLed as soon as its first message reaches Redis, before it could
    record any message as sent. A new scheduler sends them again; the duplicates are
    harmless (only a queued job can be claimed)."""
    total = 120
    cluster.add_studies(total, seed=4)
    first = cluster.spawn("scheduler", "scheduler-killed")
    deadline = time.monotonic() + 120
    while _queued_in_redis(cluster) == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    cluster.kill(first)
    in_redis = _queued_in_redis(cluster)
    marked = _count(cluster, Job.enqueued_at.is_not(None))
    print(f"\nscheduler killed with {in_redis} message(s) in Redis, {marked} marked sent")
    assert _count(cluster) == total  # the jobs were committed before any send
    assert 0 < in_redis and marked < total  # killed between sending and recording
    cluster.spawn("worker", "worker-1")
    cluster.spawn("worker", "worker-2")
    cluster.spawn("scheduler", "scheduler-2")
    cluster.wait_finished(timeout=240)
    board = cluster.scoreboard("scheduler killed mid-sending")
    assert board["jobs_succeeded"] == total


def test_model_that_raises_for_one_study(cluster: Cluster) -> None:
    """The tiny ONNX model (tests.faults.model) raises in ONNX Runtime for the poison study
    (a Reshape whose target shape depends on the image's pixels). That job is retried with
    backoff, then dead with the runtime's reason; every other study finishes."""
    cluster.add_studies(6, seed=5)
    poison = cluster.add_poison()
    cluster.spawn("worker", "worker-1")
    cluster.spawn("worker", "worker-2")
    cluster.spawn("scheduler", "scheduler")
    cluster.wait_finished(timeout=180)
    board = cluster.scoreboard("model raises for one study")
    assert (board["jobs_succeeded"], board["jobs_dead"]) == (6, 1)
    with session_scope(cluster.url) as session:
        dead = session.scalars(select(Job).where(Job.state == JobState.dead)).one()
        assert dead.study.study_instance_uid == poison
        assert dead.attempts == 3 and "Reshape" in (dead.error_detail or "")
