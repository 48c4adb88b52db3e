"""Worker and dispatch behaviour: idempotent redelivery, acknowledgement only after the
findings commit, the send-after-commit outbox, permanent failures and study revisions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from db.model_registry import register_bundle
from db.models import Finding, Job, JobState, Study, StudyStatus
from db.queries import findings
from db.session import session_scope
from lightbox.celery_app import make_celery
from lightbox.redis_server import redis_client
from lightbox.roots import stored_file
from lightbox.synthetic import real_chest_crs, write_study
from lightbox.task_names import QUEUE
from scheduler.ingest.registration import register_file
from scheduler.scheduling.dispatch import PassReport, dispatch_ready, send_pending
from scheduler.scheduling.route import load_rules
from tests.conftest import Backend, stop_processes, wait_for
from worker.model_cache import ModelCache
from worker.process import run_job, write_results


@pytest.fixture
def env(sqlite_backend: Backend, model_bundle: Path) -> Backend:
    settings = sqlite_backend.settings.model_copy(update={"quiet_seconds": 0.0})
    sqlite_backend.settings = settings
    with session_scope(settings.sqlalchemy_url) as session:
        register_bundle(session, model_bundle, promote=True)
    return sqlite_backend


def _ingest(backend: Backend, paths: list[Path]) -> None:
    for path in paths:
        register_file(backend.settings, path)


def _dispatch(backend: Backend) -> list[int]:
    report = PassReport()
    dispatch_ready(backend.settings, load_rules(), report)
    with session_scope(backend.settings.sqlalchemy_url) as session:
        return list(session.scalars(select(Job.id).order_by(Job.id)))


def _count_findings(backend: Backend, job_id: int | None = None) -> int:
    with session_scope(backend.settings.sqlalchemy_url) as session:
        query = select(func.count()).select_from(Finding)
        if job_id is not None:
            query = query.where(Finding.job_id == job_id)
        return int(session.scalar(query) or 0)


def test_redelivered_job_writes_no_duplicate_findings(env: Backend, tmp_path: Path) -> None:
    study = write_study(tmp_path / "in", np.random.default_rng(1), label=1, images=3)
    _ingest(env, list(study.paths))
    [job_id] = _dispatch(env)
    cache = ModelCache(env.settings, "onnxruntime")
    assert run_job(env.settings, cache, job_id) == "succeeded"
    assert _count_findings(env, job_id) == 3
    # The same message delivered again (worker died after commit, before ack): no new rows.
    assert run_job(env.settings, cache, job_id) == "succeeded"
    assert _count_findings(env, job_id) == 3
    # A crash after inference but before the commit means the write happens again: it replaces.
    rows = [{"job_id": job_id, "study_id": 1, "series_instance_uid": "1.2", "sop_instance_uid": s,
             "label": "pneumonia", "score": 0.5, "threshold": 0.5, "positive": True,
             "superseded": False} for s in study.sop_instance_uids]
    write_results(env.settings, job_id, rows)
    write_results(env.settings, job_id, rows)
    assert _count_findings(env, job_id) == 3


def test_outbox_sends_each_committed_job_once(env: Backend, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for i in range(3):
        _ingest(env, list(write_study(tmp_path / f"s{i}", rng, label=i % 2).paths))
    job_ids = _dispatch(env)
    assert len(job_ids) == 3
    client = redis_client(env.broker_url)
    assert client.llen(f"{QUEUE}:5") == 0  # rows committed, nothing sent yet (a crash here is safe)
    app = make_celery(env.settings)
    report = PassReport()
    send_pending(env.settings, app, report)
    assert report.jobs_sent == 3
    assert client.llen(f"{QUEUE}:5") == 3  # routine priority sub-queue
    send_pending(env.settings, app, report)
    assert report.jobs_sent == 3 and client.llen(f"{QUEUE}:5") == 3
    with session_scope(env.settings.sqlalchemy_url) as session:
        assert all(j.enqueued_at is not None for j in session.scalars(select(Job)))


@pytest.mark.slow
def test_job_acknowledged_only_after_findings_commit(env: Backend, tmp_path: Path) -> None:
    """A real Celery worker: while its findings transaction is blocked, the message stays
    unacknowledged in Redis; once the commit goes through, it is acknowledged."""
    study_uid, paths = real_chest_crs(tmp_path / "in")  # 2 full-size CRs: decoding takes a while
    _ingest(env, paths)
    [job_id] = _dispatch(env)
    app = make_celery(env.settings)
    send_pending(env.settings, app, PassReport())
    client = redis_client(env.broker_url)
    worker = env.spawn("worker", log=tmp_path / "worker.log")
    db_path = env.settings.data_path / "lightbox.db"
    lock = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    try:
        def running() -> bool:
            row = lock.execute("select state from jobs where id=?", (job_id,)).fetchone()
            return row is not None and row[0] == "running"

        wait_for(running, timeout=60, interval=0.01, what="worker to claim the job")
        lock.execute("BEGIN EXCLUSIVE")  # the worker's findings commit now has to wait
        import time

        time.sleep(3.0)
        state = lock.execute("select state from jobs where id=?", (job_id,)).fetchone()[0]
        assert state == "running"
        assert lock.execute("select count(*) from findings").fetchone()[0] == 0
        assert client.hlen("unacked") == 1  # delivered to the worker, not acknowledged
        lock.execute("COMMIT")
        wait_for(lambda: client.hlen("unacked") == 0, timeout=60, what="acknowledgement")
        state = lock.execute("select state from jobs where id=?", (job_id,)).fetchone()[0]
        assert state == "succeeded"
        assert lock.execute("select count(*) from findings").fetchone()[0] == 2
    finally:
        lock.close()
        stop_processes([worker])


def test_undecodable_pixels_fail_only_their_job(env: Backend, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    good = write_study(tmp_path / "good", rng, label=0)
    _, real = real_chest_crs(tmp_path / "bad")
    _ingest(env, [*good.paths, real[1]])  # the JPEG 2000 CR
    with session_scope(env.settings.sqlalchemy_url) as session:
        from db.models import Instance

        j2k = session.scalars(select(Instance).where(
            Instance.transfer_syntax_uid == "1.2.840.10008.1.2.4.90")).one()
        stored = stored_file(env.settings, j2k.stored_path or "")
    data = bytearray(stored.read_bytes())
    start = len(data) - 200_000
    data[start:] = bytes(len(data) - start)  # zero the end of the codestream
    stored.write_bytes(bytes(data))
    cache = ModelCache(env.settings, "onnxruntime")
    outcomes = {job_id: run_job(env.settings, cache, job_id) for job_id in _dispatch(env)}
    assert sorted(outcomes.values()) == ["dead", "succeeded"]
    with session_scope(env.settings.sqlalchemy_url) as session:
        dead = session.scalars(select(Job).where(Job.state == JobState.dead)).one()
        assert dead.error_code == "pixel_decode" and j2k.sop_instance_uid in (dead.error_detail or "")
        assert dead.attempts == 1  # a permanent error is not retried


def test_late_instance_creates_revision_and_supersedes(env: Backend, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    study = write_study(tmp_path / "a", rng, label=1, images=2)
    _ingest(env, [study.paths[0]])
    cache = ModelCache(env.settings, "onnxruntime")
    [first] = _dispatch(env)
    assert run_job(env.settings, cache, first) == "succeeded"
    _ingest(env, [study.paths[1]])  # arrives after the study was processed
    with session_scope(env.settings.sqlalchemy_url) as session:
        row = session.scalars(select(Study)).one()
        assert row.status == StudyStatus.receiving and row.revision == 2
    first_again, second = _dispatch(env)
    assert first_again == first
    assert run_job(env.settings, cache, second) == "succeeded"
    with session_scope(env.settings.sqlalchemy_url) as session:
        current = findings(session, study_uid=study.study_instance_uid)
        everything = findings(session, study_uid=study.study_instance_uid,
                              include_superseded=True)
    assert {r["sop_instance_uid"] for r in current} == set(study.sop_instance_uids)
    assert {r["job_id"] for r in current} == {second}
    assert len(everything) == 3 and sum(r["superseded"] for r in everything) == 1


@pytest.mark.slow
def test_stat_job_overtakes_routine_backlog(env: Backend, tmp_path: Path) -> None:
    """Routine jobs are queued first; a STAT job queued after them is still run first."""
    import pydicom

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - {name: stat-chest, match: {Modality: CR, SeriesDescription: '*STAT*'},"
        " models: [chest], priority: stat}\n"
        "  - {name: chest, match: {Modality: CR}, models: [chest], priority: routine}\n")
    app = make_celery(env.settings)
    rng = np.random.default_rng(5)
    for i in range(4):
        _ingest(env, list(write_study(tmp_path / f"r{i}", rng, label=0).paths))
    dispatch_ready(env.settings, load_rules(rules), PassReport())
    send_pending(env.settings, app, PassReport())
    stat = write_study(tmp_path / "stat", rng, label=1)
    ds = pydicom.dcmread(stat.paths[0])
    ds.SeriesDescription = "STAT CHEST PA"
    ds.save_as(stat.paths[0])
    _ingest(env, list(stat.paths))
    dispatch_ready(env.settings, load_rules(rules), PassReport())
    send_pending(env.settings, app, PassReport())
    worker = env.spawn("worker", log=tmp_path / "worker.log")
    try:
        def all_done() -> bool:
            with session_scope(env.settings.sqlalchemy_url) as session:
                return all(j.state == JobState.succeeded for j in session.scalars(select(Job)))

        wait_for(all_done, timeout=120, what="all five jobs")
    finally:
        stop_processes([worker])
    with session_scope(env.settings.sqlalchemy_url) as session:
        jobs = session.scalars(select(Job).order_by(Job.started_at)).all()
    assert [j.priority.value for j in jobs] == ["stat"] + ["routine"] * 4
    assert jobs[0].id == max(j.id for j in jobs)  # created last, run first


def test_in_flight_jobs_keep_their_heartbeat_while_batched(env: Backend, tmp_path: Path) -> None:
    """Jobs waiting inside the batched pipeline are alive to the scheduler: one heartbeat
    thread touches every in-flight job until its findings commit."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from worker.decode_pool import InlineDecoder
    from worker.pipeline import WorkerPipeline
    from worker.runtime import load_runtime

    release = threading.Event()

    class HeldRuntime:
        name = "onnxruntime"

        def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
            self.inner = inner

        def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            release.wait(120)
            return self.inner.infer(batch)

    rng = np.random.default_rng(7)
    for i in range(2):
        _ingest(env, list(write_study(tmp_path / f"h{i}", rng, label=0).paths))
    job_ids = _dispatch(env)
    settings = env.settings.model_copy(update={"worker_heartbeat_seconds": 0.2})
    cache = ModelCache(settings, "onnxruntime",
                       lambda kind, bundle, s: HeldRuntime(load_runtime(kind, bundle, s)))
    pipeline = WorkerPipeline(settings, cache, decoder=InlineDecoder())

    def beats() -> dict[int, object]:
        with session_scope(settings.sqlalchemy_url) as session:
            return dict(session.execute(select(Job.id, Job.heartbeat_at)).all())

    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(run_job, settings, pipeline, j) for j in job_ids]
            wait_for(lambda: all(beats().values()), timeout=60, what="jobs claimed")
            first = beats()
            wait_for(lambda: all(beats()[j] > first[j] for j in job_ids), timeout=60,
                     what="heartbeats of both in-flight jobs")
            assert _count_findings(env) == 0  # still in flight
            release.set()
            assert [f.result(120) for f in futures] == ["succeeded", "succeeded"]
    finally:
        release.set()
        pipeline.close()
    assert pipeline.heartbeats.in_flight() == []
