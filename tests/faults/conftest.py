"""Fault-injection harness: a private PostgreSQL and Redis (tests.faults.servers), the tiny
model (tests.faults.model), real `lightbox scheduler` / `lightbox worker` processes, and a
scoreboard that checks every study ended with terminal jobs and exactly its findings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from db.migrate import upgrade
from db.model_registry import register_bundle
from db.models import Finding, Job, JobState, Study
from db.queries import studies_pending
from db.session import session_scope, sessionmaker_for
from lightbox.settings import Settings
from lightbox.synthetic import write_study
from scheduler.ingest.registration import register_file
from tests.conftest import Backend, _env, stop_processes, wait_for
from tests.faults.model import tiny_bundle_fixture  # noqa: F401 - fixture
from tests.faults.servers import PostgresServer, RedisServer, Unavailable
from tests.peers import missing

FAST = {
    "LIGHTBOX_QUIET_SECONDS": "0.5",
    "LIGHTBOX_SCHEDULER_INTERVAL": "0.3",
    "LIGHTBOX_WORKER_HEARTBEAT_SECONDS": "1",
    "LIGHTBOX_HEARTBEAT_TIMEOUT_SECONDS": "6",
    "LIGHTBOX_LOST_MESSAGE_GRACE_SECONDS": "3",
    "LIGHTBOX_RECONCILE_INTERVAL": "1",
    "LIGHTBOX_VISIBILITY_TIMEOUT": "600",
    "LIGHTBOX_JOB_MAX_ATTEMPTS": "3",
    "LIGHTBOX_ONNX_THREADS": "1",
    "LIGHTBOX_LOG_LEVEL": "INFO",
}


@dataclass
class Servers:
    postgres: PostgresServer
    redis: RedisServer


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    try:
        postgres = PostgresServer()
        postgres.init()
        redis_server = RedisServer(tmp_path_factory.mktemp("faults-redis"))
        redis_server.start()
    except Unavailable as exc:
        missing("its own PostgreSQL and Redis (the fault suite)",
                f"{exc}; .ci/run installs the PostgreSQL server binaries")
    yield Servers(postgres, redis_server)
    redis_server.kill()
    postgres.stop()


@dataclass
class Cluster:
    """One scenario's database, queue and processes."""

    servers: Servers
    backend: Backend
    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=dict)  # study UID -> instances
    poisoned: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return self.backend.settings.sqlalchemy_url

    def spawn(self, command: str, name: str) -> subprocess.Popen[bytes]:
        proc = self.backend.spawn(command, log=self.logs / f"{name}.log")
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def add_studies(self, count: int, seed: int, images: int = 1) -> list[str]:
        rng = np.random.default_rng(seed)
        uids = []
        for i in range(count):
            study = write_study(self.logs.parent / "in" / f"{seed}-{i}", rng, label=i % 2,
                                images=images, size=64)
            for path in study.paths:
                register_file(self.backend.settings, path)
            self.images[study.study_instance_uid] = images
            uids.append(study.study_instance_uid)
        return uids

    def add_poison(self) -> str:
        from tests.faults.model import write_poison_study

        study = write_poison_study(self.logs.parent / "in" / "poison")
        register_file(self.backend.settings, study.paths[0])
        self.images[study.study_instance_uid] = 1
        self.poisoned.add(study.study_instance_uid)
        return study.study_instance_uid

    def jobs(self) -> list[tuple[int, str, JobState, int]]:
        with session_scope(self.url) as session:
            return [(r[0], r[1], r[2], r[3]) for r in session.execute(
                select(Job.id, Study.study_instance_uid, Job.state, Job.attempts)
                .join(Study, Job.study_id == Study.id).order_by(Job.id))]

    def finished(self) -> bool:
        try:
            with session_scope(self.url) as session:
                if studies_pending(session, list(self.images)) != 0:
                    return False
            return all(state.terminal for _, _, state, _ in self.jobs())
        except Exception:  # noqa: BLE001 - the database may be restarting under the test
            return False

    def wait_finished(self, timeout: float = 150) -> None:
        wait_for(self.finished, timeout=timeout, interval=0.5,
                 what=f"{len(self.images)} studies to finish (logs in {self.logs})")

    def scoreboard(self, scenario: str) -> dict[str, int]:
        """Count and check: one job per study, terminal, exactly the expected findings."""
        with session_scope(self.url) as session:
            per_job = dict(session.execute(
                select(Finding.job_id, func.count()).where(Finding.superseded.is_(False))
                .group_by(Finding.job_id)).all())
        jobs = self.jobs()
        by_study: dict[str, list[tuple[int, JobState]]] = {}
        for job_id, uid, state, _ in jobs:
            by_study.setdefault(uid, []).append((job_id, state))
        expected_findings = sum(self.images[uid] for uid in self.images
                                if uid not in self.poisoned)
        board = {
            "studies_sent": len(by_study),
            "studies_finished": sum(all(s.terminal for _, s in js) for js in by_study.values()),
            "studies_expected": len(self.images),
            "jobs_succeeded": sum(s == JobState.succeeded for _, _, s, _ in jobs),
            "jobs_dead": sum(s == JobState.dead for _, _, s, _ in jobs),
            "findings_expected": expected_findings,
            "findings_found": sum(per_job.values()),
        }
        print(f"\n[fault scenario] {scenario}: {json.dumps(board)}")
        assert board["studies_sent"] == board["studies_finished"] == board["studies_expected"]
        assert all(len(js) == 1 for js in by_study.values()), "a study got more than one job"
        assert board["findings_found"] == board["findings_expected"]
        for uid, [(job_id, state)] in ((u, js) for u, js in by_study.items()):
            if uid in self.poisoned:
                assert state == JobState.dead and job_id not in per_job
            else:
                assert state == JobState.succeeded and per_job.get(job_id) == self.images[uid]
        return board


@pytest.fixture
def cluster(servers: Servers, tiny_bundle: Path, tmp_path: Path) -> Iterator[Cluster]:
    if servers.redis.proc is None or servers.redis.proc.poll() is not None:
        servers.redis.start()
    servers.redis.client().flushall()
    db_url = servers.postgres.create_database(f"faults_{uuid.uuid4().hex[:10]}")
    settings = Settings(data_dir=tmp_path / "data", quiet_seconds=0.5, database_url=db_url,
                        redis_url=servers.redis.url)
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        register_bundle(session, tiny_bundle, promote=True)
    env = {**_env(settings), **FAST}
    logs = tmp_path / "logs"
    logs.mkdir()
    cluster = Cluster(servers, Backend("faults", settings, env, servers.redis.url), logs)
    yield cluster
    stop_processes(cluster.procs)
    sessionmaker_for(db_url).kw["bind"].dispose()
