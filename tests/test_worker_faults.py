"""Workers that die or freeze (issue 19, items 9 and 10): reservations of a killed worker are
cleared once their jobs are finished; a worker frozen (SIGSTOP) inside a transaction that
holds its job's row lock loses the lock and the job is requeued (PostgreSQL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select, update

from db import jobs as job_states
from db.models import Job, JobState
from db.session import session_scope
from lightbox.celery_app import make_celery
from lightbox.redis_server import redis_client
from lightbox.task_names import QUEUE
from scheduler.scheduling.dispatch import PassReport
from scheduler.scheduling.passes import run_pass
from scheduler.scheduling.reconcile import clear_finished_reservations, requeue_stale
from scheduler.scheduling.route import load_rules
from tests.conftest import Backend, wait_for
from tests.faults.model import tiny_bundle_fixture, tiny_model_fixture  # noqa: F401
from tests.test_reconcile import _jobs, _settings, _studies


def test_reservations_of_finished_jobs_are_cleared(backend: Backend, tiny_model: int,
                                                   tmp_path: Path) -> None:
    settings = _settings(backend)
    _studies(backend, tmp_path, 3)
    app = make_celery(settings)
    run_pass(settings, app, load_rules())
    jobs = _jobs(settings.sqlalchemy_url)
    client = redis_client(backend.broker_url)
    old, fresh = time.time() - 60, time.time()
    # A worker killed with -9 left its three reservations behind: job 0 finished since (run
    # again elsewhere), job 1 still running elsewhere, job 2 finished a moment ago.
    for index in range(len(jobs)):
        raw = client.rpop(f"{QUEUE}:5")
        assert raw is not None
        client.hset("unacked", f"tag-{index}", json.dumps([json.loads(raw), "", QUEUE]))
        client.zadd("unacked_index", {f"tag-{index}": fresh if index == 2 else old})
    with session_scope(settings.sqlalchemy_url) as session:
        for job in jobs:
            assert job_states.claim(session, job.id, "elsewhere") is not None
        session.execute(update(Job).where(Job.id.in_([jobs[0].id, jobs[2].id]))
                        .values(state=JobState.succeeded))
    report = PassReport()
    clear_finished_reservations(settings, report)
    assert report.reservations_cleared == 1
    assert set(client.hkeys("unacked")) == {b"tag-1", b"tag-2"}
    assert {t for t, _ in client.zrange("unacked_index", 0, -1, withscores=True)} == {
        b"tag-1", b"tag-2"}


_FROZEN = """
import os, signal, sys
from sqlalchemy import select, update
from db.models import Job
from db.session import session_scope, set_worker_timeouts
set_worker_timeouts(float(sys.argv[3]))
with session_scope(sys.argv[1]) as session:
    session.scalars(select(Job).where(Job.id == int(sys.argv[2])).with_for_update()).one()
    session.execute(update(Job).where(Job.id == int(sys.argv[2])).values(worker="frozen"))
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen before its commit, row lock held
"""


# Row locks and session timeouts are PostgreSQL's (SQLite has one writer): no SQLite variant,
# rather than one that skips in CI.
@pytest.mark.slow  # a fault (a signal to a worker process) is the point
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_worker_frozen_holding_its_row_lock_is_caught(backend: Backend, tiny_model: int,
                                                      tmp_path: Path) -> None:
    settings = _settings(backend, heartbeat_timeout_seconds=2.0)
    _studies(backend, tmp_path, 1)
    run_pass(settings, make_celery(settings), load_rules())
    [job] = _jobs(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        assert job_states.claim(session, job.id, "worker-1") is not None
        session.execute(update(Job).where(Job.id == job.id).values(
            heartbeat_at=datetime.now(timezone.utc) - timedelta(seconds=60)))
    frozen = subprocess.Popen(
        [sys.executable, "-c", _FROZEN, settings.sqlalchemy_url, str(job.id), "3"],
        stdout=subprocess.PIPE, text=True, env=backend.env)
    try:
        assert frozen.stdout is not None and frozen.stdout.readline().strip() == "locked"
        wait_for(lambda: os.waitpid(frozen.pid, os.WNOHANG | os.WUNTRACED) != (0, 0), 30,
                 what="the worker process to stop")

        def requeued() -> bool:
            report = PassReport()
            requeue_stale(settings, report)
            return report.jobs_stale == 1

        wait_for(requeued, 60, interval=0.5, what="the frozen worker's job to be requeued")
        with session_scope(settings.sqlalchemy_url) as session:
            row = session.scalars(select(Job).where(Job.id == job.id)).one()
            assert row.state == JobState.queued and row.error_code == "heartbeat_lost"
            assert row.worker == "worker-1"  # the frozen transaction never committed
    finally:
        frozen.send_signal(signal.SIGKILL)
        frozen.send_signal(signal.SIGCONT)
        frozen.wait(timeout=30)


@pytest.mark.slow  # a fault (a signal to a worker process) is the point
def test_worker_killed_with_sigkill_is_listed_gone(sqlite_backend: Backend,
                                                   tmp_path: Path) -> None:
    backend = sqlite_backend
    env = {**backend.env, "LIGHTBOX_HEARTBEAT_TIMEOUT_SECONDS": "3"}

    def workers() -> dict[str, str]:
        out = subprocess.run([sys.executable, "-m", "cli.main", "status", "--format", "json"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return {w["hostname"]: w["state"] for w in json.loads(out.stdout)["workers"]}

    worker = backend.spawn("worker", log=tmp_path / "worker.log")
    try:
        seen = wait_for(lambda: workers(), 180, interval=1, what="the worker to register")
        assert set(seen.values()) == {"alive"}
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        states = wait_for(lambda: (s := workers()) and "alive" not in s.values() and s, 60,
                          interval=1, what="the killed worker to be listed gone")
        assert set(states.values()) == {"gone"} and set(states) == set(seen)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
