"""Priorities: STAT (by calling AE title, a tag value or the requested priority) runs before
routine, and routine is not starved: a routine job that waited past ``stat_aging_seconds`` is
sent again at STAT priority, behind the STAT work already waiting but ahead of later STAT."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from db.models import Job, JobState, Priority, Study
from db.session import session_scope
from lightbox.celery_app import make_celery
from lightbox.redis_server import redis_client
from lightbox.synthetic import write_study
from lightbox.task_names import job_id_of_task, queue_keys
from scheduler.ingest.registration import register_file
from scheduler.scheduling.passes import run_pass
from scheduler.scheduling.route import load_rules
from tests.conftest import Backend, stop_processes, wait_for
from tests.faults.model import tiny_bundle_fixture, tiny_model_fixture  # noqa: F401

RULES = """
rules:
  - {name: chest, match: {Modality: [CR, DX]}, models: [chest]}
  - {name: emergency, match: {CallingAETitle: ["ED_*"]}, priority: stat}
  - {name: stat-description, match: {StudyDescription: "*STAT*"}, priority: stat}
  - {name: requested, match: {RequestedProcedurePriority: [STAT, HIGH]}, priority: stat}
"""


def _study(tmp_path: Path, rng: np.random.Generator, name: str, *, description: str | None = None,
           requested: str | None = None) -> list[Path]:
    study = write_study(tmp_path / name, rng, label=0, images=1, size=64)
    for path in study.paths:
        if description or requested:
            ds = pydicom.dcmread(path)
            if description:
                ds.StudyDescription = description
            if requested:
                ds.RequestedProcedurePriority = requested
            ds.save_as(path)
    return list(study.paths)


def _pop_in_worker_order(url: str) -> list[int]:
    """Drain the queue the way kombu's consumer does: the highest priority list first,
    oldest message first (LPUSH + BRPOP)."""
    client = redis_client(url)
    order = []
    for key in queue_keys():
        while (raw := client.rpop(key)) is not None:
            order.append(job_id_of_task(json.loads(raw)["headers"]["id"]))
    return [j for j in order if j is not None]


def test_stat_by_ae_title_tag_and_requested_priority(backend: Backend, tiny_model: int,
                                                     tmp_path: Path) -> None:
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(RULES)
    settings = backend.settings.model_copy(update={"quiet_seconds": 0.0})
    rng = np.random.default_rng(0)
    sources = {"routine": ("folder", _study(tmp_path, rng, "a")),
               "ae": ("scp:ED_CR1", _study(tmp_path, rng, "b")),
               "other-ae": ("scp:RAD_CR1", _study(tmp_path, rng, "c")),
               "tag": ("folder", _study(tmp_path, rng, "d", description="XR CHEST STAT")),
               "requested": ("folder", _study(tmp_path, rng, "e", requested="HIGH"))}
    uid_of = {}
    for name, (source, paths) in sources.items():
        for path in paths:
            uid_of[name] = register_file(settings, path, source=source).study_instance_uid
    run_pass(settings, make_celery(settings), load_rules(rules_path))
    with session_scope(settings.sqlalchemy_url) as session:
        priority = dict(session.execute(select(Study.study_instance_uid, Job.priority)
                                        .join(Job, Job.study_id == Study.id)).all())
    got = {name: priority[uid] for name, uid in uid_of.items()}
    assert got == {"routine": Priority.routine, "ae": Priority.stat,
                   "other-ae": Priority.routine, "tag": Priority.stat,
                   "requested": Priority.stat}
    # STAT messages are taken first.
    order = _pop_in_worker_order(backend.broker_url)
    with session_scope(settings.sqlalchemy_url) as session:
        stat_ids = set(session.scalars(select(Job.id).where(Job.priority == Priority.stat)))
    assert set(order[:3]) == stat_ids and len(order) == 5


def test_routine_is_not_starved_by_a_stat_flood(backend: Backend, tiny_model: int,
                                                tmp_path: Path) -> None:
    """Routine jobs queued first, then STAT jobs keep arriving. Without aging every STAT job
    would be taken before them; with it, each routine job is taken before the STAT jobs that
    arrived after it had waited ``stat_aging_seconds``."""
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(RULES)
    settings = backend.settings.model_copy(update={"quiet_seconds": 0.0,
                                                   "stat_aging_seconds": 0.0})
    app, rules, rng = make_celery(settings), load_rules(rules_path), np.random.default_rng(1)
    for i in range(3):
        for path in _study(tmp_path, rng, f"r{i}"):
            register_file(settings, path)
    run_pass(settings.model_copy(update={"stat_aging_seconds": 3600.0}), app, rules)
    for i in range(3):  # the flood: STAT before the routine jobs aged
        for path in _study(tmp_path, rng, f"early{i}", description="STAT"):
            register_file(settings, path)
    run_pass(settings.model_copy(update={"stat_aging_seconds": 3600.0}), app, rules)
    report = run_pass(settings, app, rules)  # the routine jobs have now waited long enough
    assert report.jobs_escalated == 3
    for i in range(3):  # the flood goes on
        for path in _study(tmp_path, rng, f"late{i}", description="STAT"):
            register_file(settings, path)
    report = run_pass(settings, app, rules)
    assert report.jobs_escalated == 0  # STAT jobs are never "escalated"; routine only once
    with session_scope(settings.sqlalchemy_url) as session:
        ids = list(session.scalars(select(Job.id).order_by(Job.id)))
    routine, early, late = ids[:3], ids[3:6], ids[6:9]
    order = _pop_in_worker_order(backend.broker_url)
    first_seen = {job_id: order.index(job_id) for job_id in ids}
    assert max(first_seen[j] for j in early) < min(first_seen[j] for j in routine)
    assert max(first_seen[j] for j in routine) < min(first_seen[j] for j in late)


@pytest.mark.slow
def test_stat_latency_below_routine_under_load(sqlite_backend: Backend, tiny_bundle: Path,
                                               tmp_path: Path) -> None:
    """Real scheduler and worker: a routine backlog, then STAT studies. STAT jobs finish with
    a lower mean latency (created → finished) than routine ones, and every routine job ends."""
    from db.model_registry import register_bundle

    backend = sqlite_backend
    with session_scope(backend.settings.sqlalchemy_url) as session:
        register_bundle(session, tiny_bundle, promote=True)
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(RULES)
    backend.env.update({"LIGHTBOX_RULES_FILE": str(rules_path), "LIGHTBOX_QUIET_SECONDS": "0",
                        "LIGHTBOX_STAT_AGING_SECONDS": "30"})
    rng = np.random.default_rng(2)
    routine, stat = 60, 6
    for i in range(routine):
        for path in _study(tmp_path, rng, f"r{i}"):
            register_file(backend.settings, path)
    url = backend.settings.sqlalchemy_url
    procs = [backend.spawn("scheduler", log=tmp_path / "scheduler.log")]
    try:
        wait_for(lambda: _jobs_sent(url) == routine, timeout=120, what="routine backlog sent")
        for i in range(stat):
            for path in _study(tmp_path, rng, f"s{i}", description="STAT CHEST"):
                register_file(backend.settings, path)
        wait_for(lambda: _jobs_sent(url) == routine + stat, timeout=120, what="STAT sent")
        procs.append(backend.spawn("worker", log=tmp_path / "worker.log"))

        def done() -> bool:
            with session_scope(url) as session:
                return all(j.state == JobState.succeeded for j in session.scalars(select(Job)))

        wait_for(done, timeout=300, interval=0.5, what="every job")
    finally:
        stop_processes(procs)
    with session_scope(url) as session:
        rows = session.execute(select(Job.priority, Job.created_at, Job.finished_at)).all()
    latency: dict[str, list[float]] = {"stat": [], "routine": []}
    for priority, created, finished in rows:
        latency[priority.value].append((finished - created).total_seconds())
    summary = {k: {"jobs": len(v), "mean_s": round(statistics.mean(v), 3),
                   "max_s": round(max(v), 3)} for k, v in latency.items()}
    print(f"\n[priorities] {json.dumps(summary)}")
    assert summary["routine"]["jobs"] == routine and summary["stat"]["jobs"] == stat
    # STAT jobs were created after the whole routine backlog, yet finish sooner after creation.
    assert summary["stat"]["mean_s"] < summary["routine"]["mean_s"]


def _jobs_sent(url: str) -> int:
    with session_scope(url) as session:
        return len(list(session.scalars(select(Job.id).where(Job.enqueued_at.is_not(None)))))


