"""Scheduler reconciliation on both backends: stale heartbeats, lost messages, duplicate
messages, aging of routine jobs, operator commands, retention, late instances, and several
schedulers and workers at once on PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select, update

from db import jobs as job_states
from db.models import Event, Finding, Instance, Job, JobState, Study
from db.queries import findings
from db.session import session_scope
from lightbox.celery_app import make_celery
from lightbox.redis_server import redis_client
from lightbox.roots import stored_file
from lightbox.synthetic import write_study
from lightbox.task_names import QUEUE, job_id_of_task, job_task_id
from scheduler.ingest.registration import register_file
from scheduler.scheduling.dispatch import PassReport, dispatch_ready, send_pending
from scheduler.scheduling.passes import run_pass
from scheduler.scheduling.reconcile import jobs_with_messages
from scheduler.scheduling.retention import delete_expired_pixels
from scheduler.scheduling.route import load_rules
from tests.conftest import Backend, run_cli, stop_processes, wait_for
from tests.faults.model import tiny_bundle_fixture, tiny_model_fixture  # noqa: F401


def _settings(backend: Backend, **update: object):  # type: ignore[no-untyped-def]
    base = {"quiet_seconds": 0.0, "heartbeat_timeout_seconds": 5.0,
            "lost_message_grace_seconds": 0.0, "stat_aging_seconds": 3600.0}
    return backend.settings.model_copy(update={**base, **update})


def _studies(backend: Backend, tmp_path: Path, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    uids = []
    for i in range(count):
        study = write_study(tmp_path / f"in{seed}-{i}", rng, label=i % 2, images=1, size=64)
        for path in study.paths:
            register_file(backend.settings, path)
        uids.append(study.study_instance_uid)
    return uids


def _jobs(url: str) -> list[Job]:
    with session_scope(url) as session:
        rows = list(session.scalars(select(Job).order_by(Job.id)))
        session.expunge_all()
        return rows


def _cli(backend: Backend, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(backend.env, *args)  # in process: the commands, not the processes, are tested


def test_task_ids_carry_the_job_id() -> None:
    assert job_id_of_task(job_task_id(42, "abc")) == 42
    assert job_id_of_task("0b0c7e2a-some-celery-uuid") is None
    assert job_id_of_task("lightbox-job-x-1") is None


def test_duplicate_message_cannot_run_a_job_twice(backend: Backend, tiny_model: int,
                                                  tmp_path: Path) -> None:
    """Only a queued job can be claimed: a second message for a running or finished job is
    dropped, so resending when in doubt is safe."""
    settings = _settings(backend)
    _studies(backend, tmp_path, 1)
    dispatch_ready(settings, load_rules(), PassReport())
    [job] = _jobs(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        assert job_states.claim(session, job.id, "w1") is not None
    with session_scope(settings.sqlalchemy_url) as session:
        assert job_states.claim(session, job.id, "w2") is None  # running elsewhere
        running = session.get(Job, job.id)
        assert running is not None and running.worker == "w1" and running.attempts == 1
        job_states.succeed(session, running)
    with session_scope(settings.sqlalchemy_url) as session:
        assert job_states.claim(session, job.id, "w3") is None  # finished


def test_stale_running_job_is_requeued_then_dead(backend: Backend, tiny_model: int,
                                                 tmp_path: Path) -> None:
    settings = _settings(backend, job_max_attempts=2)
    _studies(backend, tmp_path, 2)
    app = make_celery(settings)
    run_pass(settings, app, load_rules())
    job, live = _jobs(settings.sqlalchemy_url)
    url = settings.sqlalchemy_url
    old = datetime.now(timezone.utc) - timedelta(seconds=60)
    with session_scope(url) as session:
        assert job_states.claim(session, live.id, "live-worker") is not None
    for attempt in (1, 2):
        with session_scope(url) as session:
            assert job_states.claim(session, job.id, f"worker-{attempt}") is not None
            session.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=old))
            # A live job (fresh heartbeat) is left alone by the same pass.
            session.execute(update(Job).where(Job.id == live.id).values(
                heartbeat_at=datetime.now(timezone.utc)))
        report = run_pass(settings, app, load_rules())
        job, still_live = _jobs(url)
        assert (still_live.state, still_live.worker, still_live.attempts,
                still_live.error_code) == (JobState.running, "live-worker", 1, None)
        assert job.error_code == "heartbeat_lost" and job.attempts == attempt
        if attempt == 1:
            assert (report.jobs_stale, job.state) == (1, JobState.queued)
            assert job.enqueued_at is not None  # resent in the same pass
            assert job.id in jobs_with_messages(backend.broker_url)
        else:
            assert (report.jobs_dead, job.state) == (1, JobState.dead)
            assert "stopped sending heartbeats" in (job.error_detail or "")


def test_live_heartbeat_is_not_requeued(backend: Backend, tiny_model: int,
                                        tmp_path: Path) -> None:
    settings = _settings(backend)
    _studies(backend, tmp_path, 1)
    app = make_celery(settings)
    run_pass(settings, app, load_rules())
    [job] = _jobs(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        job_states.claim(session, job.id, "alive")
    report = run_pass(settings, app, load_rules())
    assert report.jobs_stale == 0 and _jobs(settings.sqlalchemy_url)[0].state == JobState.running


def test_messages_lost_with_redis_are_sent_again(backend: Backend, tiny_model: int,
                                                 tmp_path: Path) -> None:
    settings = _settings(backend)
    _studies(backend, tmp_path, 3)
    app = make_celery(settings)
    first = run_pass(settings, app, load_rules())
    assert first.jobs_sent == 3
    ids = {j.id for j in _jobs(settings.sqlalchemy_url)}
    assert jobs_with_messages(backend.broker_url) == ids
    client = redis_client(backend.broker_url)
    # Nothing lost: nothing resent.
    assert run_pass(settings, app, load_rules()).jobs_lost == 0
    client.flushdb()  # Redis restarted empty
    assert jobs_with_messages(backend.broker_url) == set()
    report = run_pass(settings, app, load_rules())
    assert (report.jobs_lost, report.jobs_sent) == (3, 3)
    assert jobs_with_messages(backend.broker_url) == ids
    assert client.llen(f"{QUEUE}:5") == 3  # one message each, not more


def test_reserved_message_counts_as_present(backend: Backend, tiny_model: int,
                                            tmp_path: Path) -> None:
    """A message a worker reserved (kombu's unacked hash) is not lost, unless the reservation
    is older than the heartbeat timeout and the job was still never claimed."""
    settings = _settings(backend)
    _studies(backend, tmp_path, 1)
    app = make_celery(settings)
    run_pass(settings, app, load_rules())
    [job] = _jobs(settings.sqlalchemy_url)
    client = redis_client(backend.broker_url)
    raw = client.rpop(f"{QUEUE}:5")
    client.hset("unacked", "tag-1", json.dumps([json.loads(raw), "", QUEUE]))
    client.zadd("unacked_index", {"tag-1": time.time()})
    assert jobs_with_messages(backend.broker_url) == {job.id}
    assert run_pass(settings, app, load_rules()).jobs_lost == 0
    # Reserved long ago by a worker that never claimed it (killed with it prefetched).
    client.zadd("unacked_index", {"tag-1": time.time() - 60})
    assert jobs_with_messages(backend.broker_url, reserved_limit_seconds=5) == set()
    report = run_pass(settings, app, load_rules())
    assert (report.jobs_lost, report.jobs_sent) == (1, 1)


def test_routine_job_waiting_too_long_is_sent_at_stat_once(
        backend: Backend, tiny_model: int, tmp_path: Path) -> None:
    settings = _settings(backend, stat_aging_seconds=0.0)
    _studies(backend, tmp_path, 2)
    app = make_celery(settings)
    report = run_pass(settings, app, load_rules())
    assert (report.jobs_sent, report.jobs_escalated) == (2, 2)
    client = redis_client(backend.broker_url)
    assert client.llen(QUEUE) == 2 and client.llen(f"{QUEUE}:5") == 2
    assert run_pass(settings, app, load_rules()).jobs_escalated == 0
    assert all(j.escalated_at is not None for j in _jobs(settings.sqlalchemy_url))


def test_operator_retry_requeue_and_cancel(backend: Backend, tiny_model: int,
                                           tmp_path: Path) -> None:
    settings = _settings(backend)
    _studies(backend, tmp_path, 3)
    dispatch_ready(settings, load_rules(), PassReport())
    a, b, c = (j.id for j in _jobs(settings.sqlalchemy_url))
    url = settings.sqlalchemy_url
    with session_scope(url) as session:
        for job_id in (a, b):
            job = job_states.claim(session, job_id, "w")
            assert job is not None
            job_states.fail(session, job, code="model_error", detail="RuntimeError: boom",
                            retryable=False, max_attempts=3)
    status = json.loads(_cli(backend, "status", "--format", "json").stdout)
    assert status["jobs"]["dead"] == 2
    assert {j["error_code"] for j in status["problem_jobs"]} == {"model_error"}
    assert "RuntimeError: boom" in _cli(backend, "status").stdout

    out = _cli(backend, "jobs", "retry", str(a))
    assert out.returncode == 0, out.stderr
    out = _cli(backend, "jobs", "retry", str(c))  # queued: nothing to retry
    assert out.returncode != 0 and "only failed, dead or cancelled" in out.stderr
    states = {j.id: j for j in _jobs(url)}
    assert states[a].state == JobState.queued and states[a].attempts == 0
    assert states[b].state == JobState.dead

    out = _cli(backend, "jobs", "requeue", "--dead")
    assert out.returncode == 0 and "1 dead job(s) queued again" in out.stdout
    out = _cli(backend, "jobs", "cancel", str(c))
    assert out.returncode == 0, out.stderr
    assert _cli(backend, "jobs", "cancel", str(c)).returncode != 0
    assert _cli(backend, "jobs", "cancel", "99999").returncode != 0
    states = {j.id: j.state for j in _jobs(url)}
    assert states == {a: JobState.queued, b: JobState.queued, c: JobState.cancelled}
    listed = json.loads(_cli(backend, "jobs", "list", "--state", "cancelled",
                             "--format", "json").stdout)
    assert [r["job_id"] for r in listed] == [c]
    # A cancelled job's message is dropped and a late result does not revive it.
    with session_scope(url) as session:
        assert job_states.claim(session, c, "w") is None
        job = session.get(Job, c)
        assert job is not None
        job_states.succeed(session, job)
        assert job.state == JobState.cancelled
    # The outbox sends what the operator requeued.
    report = PassReport()
    send_pending(settings, make_celery(settings), report)
    assert report.jobs_sent == 2


def test_retention_deletes_old_pixels_and_keeps_findings(
        backend: Backend, tiny_model: int, tmp_path: Path) -> None:
    from worker.model_cache import ModelCache
    from worker.process import run_job

    settings = _settings(backend, retention_days=1.0)
    uids = _studies(backend, tmp_path, 2)
    dispatch_ready(settings, load_rules(), PassReport())
    jobs = _jobs(settings.sqlalchemy_url)
    cache = ModelCache(settings, "onnxruntime")
    assert run_job(settings, cache, jobs[0].id) == "succeeded"  # the other stays queued
    url = settings.sqlalchemy_url
    with session_scope(url) as session:
        paths = dict(session.execute(select(Instance.id, Instance.stored_path)).all())
    assert delete_expired_pixels(settings) == 0  # nothing is old enough yet
    later = datetime.now(timezone.utc) + timedelta(days=2)
    assert delete_expired_pixels(settings, now=later) == 1  # the open study's pixels are kept
    with session_scope(url) as session:
        rows = session.execute(select(Instance.id, Instance.stored_path, Study.study_instance_uid)
                               .join(Instance.series).join(Study)).all()
        kept = findings(session, study_uid=uids[0])
        events = session.scalars(select(Event).where(Event.kind == "pixels_deleted")).all()
    by_study = {uid: (iid, path) for iid, path, uid in rows}
    deleted_id, deleted_path = by_study[uids[0]]
    assert deleted_path is None and not stored_file(settings, paths[deleted_id]).exists()
    assert by_study[uids[1]][1] is not None and stored_file(settings, by_study[uids[1]][1]).exists()
    assert len(kept) == 1 and len(events) == 1 and events[0].detail["instances"] == 1


def test_late_instance_creates_revision_and_supersedes_on_both_backends(
        backend: Backend, tiny_model: int, tmp_path: Path) -> None:
    from worker.model_cache import ModelCache
    from worker.process import run_job

    settings = _settings(backend)
    study = write_study(tmp_path / "a", np.random.default_rng(4), label=1, images=2, size=64)
    register_file(settings, study.paths[0])
    dispatch_ready(settings, load_rules(), PassReport())
    cache = ModelCache(settings, "onnxruntime")
    [first] = _jobs(settings.sqlalchemy_url)
    assert run_job(settings, cache, first.id) == "succeeded"
    register_file(settings, study.paths[1])
    dispatch_ready(settings, load_rules(), PassReport())
    first_again, second = _jobs(settings.sqlalchemy_url)
    assert first_again.id == first.id and second.study_revision == 2
    assert run_job(settings, cache, second.id) == "succeeded"
    with session_scope(settings.sqlalchemy_url) as session:
        current = findings(session, study_uid=study.study_instance_uid)
        everything = findings(session, study_uid=study.study_instance_uid,
                              include_superseded=True)
    assert {r["job_id"] for r in current} == {second.id} and len(current) == 2
    assert len(everything) == 3 and sum(r["superseded"] for r in everything) == 1


@pytest.mark.slow
@pytest.mark.postgres
def test_two_schedulers_three_workers_no_duplicates(postgres_backend: Backend,
                                                    tiny_bundle: Path, tmp_path: Path) -> None:
    """Two `lightbox scheduler` and three `lightbox worker` processes on PostgreSQL: every
    study gets exactly one job per model and every job exactly its findings."""
    from db.model_registry import register_bundle

    backend = postgres_backend
    with session_scope(backend.settings.sqlalchemy_url) as session:
        register_bundle(session, tiny_bundle, promote=True)
    backend.env["LIGHTBOX_QUIET_SECONDS"] = "0.5"
    backend.env["LIGHTBOX_RECONCILE_INTERVAL"] = "1"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [backend.spawn("worker", log=logs / f"worker{i}.log") for i in range(3)]
    uids = _studies(backend, tmp_path, 12, seed=9)
    procs += [backend.spawn("scheduler", log=logs / f"scheduler{i}.log") for i in range(2)]
    url = backend.settings.sqlalchemy_url
    try:
        def done() -> bool:
            jobs = _jobs(url)
            return len(jobs) >= len(uids) and all(j.state == JobState.succeeded for j in jobs)

        wait_for(done, timeout=240, interval=0.5, what="12 studies through 2 schedulers")
    finally:
        stop_processes(procs)
    with session_scope(url) as session:
        per_study = session.execute(select(Job.study_id, func.count()).group_by(Job.study_id)).all()
        total_findings = session.scalar(select(func.count()).select_from(Finding))
        sent = session.scalar(select(func.count()).select_from(Event)
                              .where(Event.kind == "study_dispatched"))
    assert len(per_study) == 12 and all(count == 1 for _, count in per_study)
    assert sent == 12  # each study dispatched by exactly one scheduler
    assert total_findings == 12  # one image, one label per study
