"""Running as a cluster: storage shared by nodes that mount it at different paths, migrations as
a step of their own, metrics and probes of every process, and a graceful stop on SIGTERM.

Nodes are simulated on one machine by giving each process its own data dir, working directory
and mount point (a bind mount of one shared folder) over one PostgreSQL and one Redis."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from sqlalchemy import func, select

from db.migrate import MIGRATION_LOCK_KEY, current_revision, expected_revisions, upgrade
from db.model_registry import register_bundle
from db.models import Export, Finding, Instance, Job, JobState, Model
from db.session import session_scope
from lightbox.celery_app import make_celery
from lightbox.errors import ConfigurationError
from lightbox.metrics import readiness, redis_check, serve_probes
from lightbox.roots import bundle_dir, relative_to_root, resolve_under, stored_file
from lightbox.settings import Settings
from lightbox.synthetic import write_study
from scheduler.ingest.registration import register_file
from scheduler.scheduling.dispatch import PassReport, dispatch_ready, send_pending
from scheduler.scheduling.route import load_rules
from tests.conftest import Backend, run_cli, stop_processes, wait_for
from tests.pacs_peers import free_port

CLI = [sys.executable, "-m", "cli.main"]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- 1. paths relative to the roots ------------------------------------------------------------

def test_roots_relative_and_absolute(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    assert relative_to_root(root, root / "1.2" / "3.4" / "5.dcm") == "1.2/3.4/5.dcm"
    outside = tmp_path / "elsewhere" / "b"
    assert relative_to_root(root, outside) == str(outside)  # kept whole
    assert resolve_under(tmp_path / "mnt", "1.2/5.dcm") == tmp_path / "mnt" / "1.2" / "5.dcm"
    assert resolve_under(tmp_path / "mnt", str(outside)) == outside
    settings = Settings(data_dir=tmp_path / "d", storage_dir=Path("rel-storage"))
    assert settings.storage_dir == Path.cwd() / "rel-storage"
    assert settings.models_dir == tmp_path / "d" / "models"
    assert settings.heatmaps_dir.parent == settings.storage_dir


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """An empty database: None for a SQLite file in the data dir, else a PostgreSQL URL."""
    if request.param == "sqlite":
        yield None
        return
    from tests.conftest import PG_ADMIN_URL

    name = f"lightbox_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    from db.session import sessionmaker_for

    sessionmaker_for(url).kw["bind"].dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_migration_makes_old_absolute_paths_relative(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      empty_database: str | None) -> None:
    """Rows written by an older release (absolute paths) become relative to the roots the
    migration runs with; paths outside the roots stay as they are."""
    data = tmp_path / "old_node%"  # LIKE's wildcards in the root are taken literally
    monkeypatch.setenv("LIGHTBOX_DATA_DIR", str(data))
    if empty_database:
        monkeypatch.setenv("LIGHTBOX_DATABASE_URL", empty_database)
    settings = Settings()
    url = settings.sqlalchemy_url
    upgrade(url, "0003_reliability")
    upgrade(url, "0002_pacs")
    stored = settings.storage_dir / "1.2" / "1.3" / "1.4.dcm"
    bundle = settings.models_dir / "chest" / "1"
    # Rows as the old release wrote them: through the tables as they are at that revision (the
    # ORM models describe today's schema, with columns later migrations add).
    engine = sa.create_engine(url)
    tables = sa.MetaData()
    tables.reflect(bind=engine)
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        def insert(table: str, **values: object) -> int:
            result = conn.execute(tables.tables[table].insert().values(**values))
            return int(result.inserted_primary_key[0])

        study = insert("studies", study_instance_uid="1.2", status="receiving", revision=1,
                       dispatched_revision=0, priority="routine", first_received_at=now,
                       last_received_at=now)
        series = insert("series", study_id=study, series_instance_uid="1.3", tags={})
        for sop, path in (("1.4", str(stored)), ("1.5", "/mnt/other/1.5.dcm")):
            insert("instances", series_id=series, sop_instance_uid=sop, sop_class_uid="1.1",
                   transfer_syntax_uid="1.2.840.10008.1.2.1", stored_path=path, size_bytes=1,
                   sha256="0" * 64, study_revision=1, source="folder", received_at=now)
        insert("models", name="chest", version="1", stage="staging", bundle_path=str(bundle),
               manifest={}, registered_at=now)
    engine.dispose()
    upgrade(url)
    with session_scope(url) as session:
        paths = dict(session.execute(
            select(Instance.sop_instance_uid, Instance.stored_path)).all())
        [bundle_path] = session.scalars(select(Model.bundle_path))
    assert paths == {"1.4": "1.2/1.3/1.4.dcm", "1.5": "/mnt/other/1.5.dcm"}
    assert bundle_path == "chest/1"
    moved = Settings(data_dir=tmp_path / "new-mount")  # another node, another mount point
    assert stored_file(moved, paths["1.4"]) == moved.storage_dir / "1.2" / "1.3" / "1.4.dcm"
    assert bundle_dir(moved, bundle_path) == moved.models_dir / "chest" / "1"


# -- 2. migrations as a step of their own ------------------------------------------------------

def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """In process: what the commands refuse is the point here, not the process."""
    return run_cli(env, *args)


def test_cluster_mode_refuses_old_and_newer_schema(tmp_path: Path) -> None:
    env = {**os.environ, "LIGHTBOX_DATA_DIR": str(tmp_path / "data"), "LIGHTBOX_CLUSTER": "1"}
    url = Settings(data_dir=tmp_path / "data").sqlalchemy_url
    refused = _cli(env, "status", "--format", "json")
    assert refused.returncode != 0
    # One error line (besides the start-up log line naming the data dir and database).
    message = [line for line in refused.stderr.splitlines() if line.startswith("lightbox:")]
    assert len(message) == 1 and "`lightbox db upgrade`" in message[0], refused.stderr
    assert "Traceback" not in refused.stderr
    assert current_revision(url) is None  # the command did not migrate
    upgraded = _cli(env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert set((current_revision(url) or "").split(",")) <= expected_revisions()
    assert _cli(env, "status", "--format", "json").returncode == 0
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # as if a newer release had migrated the database
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('9999_from_the_future')"))
    engine.dispose()
    newer = _cli(env, "status", "--format", "json")
    assert newer.returncode != 0 and "newer than this Lightbox" in newer.stderr
    # Embedded mode (no LIGHTBOX_CLUSTER) keeps migrating by itself.
    embedded = {**env, "LIGHTBOX_DATA_DIR": str(tmp_path / "embedded")}
    embedded.pop("LIGHTBOX_CLUSTER")
    embedded_url = Settings(data_dir=tmp_path / "embedded").sqlalchemy_url
    upgrade(embedded_url, "0003_reliability")  # an old schema (status never creates one)
    assert _cli(embedded, "status", "--format", "json").returncode == 0
    assert set((current_revision(embedded_url) or "").split(",")) == expected_revisions()


@pytest.mark.postgres
def test_db_upgrade_waits_for_the_advisory_lock(postgres_backend: Backend) -> None:
    """Two migrators never race: `lightbox db upgrade` waits while another holds the lock,
    then finds the schema migrated; several at once all succeed."""
    url = postgres_backend.settings.sqlalchemy_url
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    env = postgres_backend.env
    with engine.connect() as holder:
        holder.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        waiting = subprocess.Popen([*CLI, "db", "upgrade"], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        try:
            def blocked() -> bool:
                with engine.connect() as conn:
                    return bool(conn.scalar(sa.text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND NOT granted AND objid = :k"), {"k": MIGRATION_LOCK_KEY}))
            wait_for(blocked, 120, what="db upgrade waiting on the migration lock")
            assert waiting.poll() is None
        finally:
            holder.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
        out, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, out
    several = [subprocess.Popen([*CLI, "db", "upgrade"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [proc.communicate(timeout=300)[0] for proc in several]
    assert [proc.returncode for proc in several] == [0, 0, 0], outputs
    engine.dispose()


# -- 3. probes ---------------------------------------------------------------------------------

def test_readyz_names_what_is_down(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0",
                        metrics_port=free_port(), metrics_bind_address="127.0.0.1")
    assert readiness({"redis": redis_check(settings)})[0] is False
    server = serve_probes(settings, {"redis": redis_check(settings)})
    assert server is not None
    try:
        base = f"http://127.0.0.1:{settings.metrics_port}"
        assert _get(f"{base}/healthz") == (200, "ok\n")
        status, text = _get(f"{base}/readyz")
        assert status == 503 and "redis" in text
        status, text = _get(f"{base}/metrics")
        assert status == 200 and "lightbox_cstore_total" in text
        with pytest.raises(ConfigurationError, match="^LIGHTBOX_METRICS_PORT="):
            serve_probes(settings, {})  # the port is taken: a one-line configuration error
    finally:
        server.shutdown()
        server.server_close()


# -- 1 + 3. two worker nodes over one shared storage, export on a third ------------------------

def _mount(shared: Path, mount_point: Path) -> None:
    mount_point.mkdir(parents=True)
    done = subprocess.run(["mount", "--bind", str(shared), str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"bind mounts unavailable here: {done.stderr.strip()}")


def _node_env(backend: Backend, home: Path, storage: str, models: str,
              **extra: str) -> dict[str, str]:
    env = dict(backend.env)
    env.update({"LIGHTBOX_DATA_DIR": str(home / "data"), "LIGHTBOX_STORAGE_DIR": storage,
                "LIGHTBOX_MODELS_DIR": models, "LIGHTBOX_CLUSTER": "1",
                "LIGHTBOX_METRICS_BIND_ADDRESS": "127.0.0.1", **extra})
    return env


def _spawn(env: dict[str, str], cwd: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen([*CLI, *args], env=env, cwd=cwd, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.postgres
@pytest.mark.slow  # processes (nodes, signals) are the point
def test_two_worker_nodes_and_an_export_node_share_one_storage(
        postgres_backend: Backend, tmp_path: Path) -> None:
    from tests.test_batching import _cam_bundle

    backend = postgres_backend
    shared = tmp_path / "shared"
    (shared / "storage").mkdir(parents=True)
    node_a, node_b, node_c = (tmp_path / name for name in ("a", "b", "c"))
    node_a.mkdir()
    _mount(shared, node_b / "mnt")
    _mount(shared, node_c / "mnt")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # Node A names the volume by its absolute path; B and C relative to their working dir.
        env_a = _node_env(backend, node_a, str(shared / "storage"), str(shared / "models"))
        env_b = _node_env(backend, node_b, "mnt/storage", "mnt/models")
        env_c = _node_env(backend, node_c, "mnt/storage", "mnt/models")
        bundle = _cam_bundle(shared / "models" / "chest-cam" / "1")
        registered = subprocess.run([*CLI, "models", "register", str(bundle), "--promote"],
                                    env=env_a, cwd=node_a, capture_output=True, text=True)
        assert registered.returncode == 0, registered.stderr
        settings_a = Settings(data_dir=node_a / "data", storage_dir=shared / "storage",
                              models_dir=shared / "models", quiet_seconds=0.0,
                              database_url=backend.settings.database_url,
                              redis_url=backend.settings.redis_url)
        rng = np.random.default_rng(16)
        studies = [write_study(tmp_path / f"in{i}", rng, label=i % 2, images=2)
                   for i in range(6)]
        for study in studies:
            for path in study.paths:
                register_file(settings_a, path)
        images = sum(len(s.paths) for s in studies)
        with session_scope(settings_a.sqlalchemy_url) as session:
            stored = list(session.scalars(select(Instance.stored_path)))
            [bundle_path] = session.scalars(select(Model.bundle_path))
        assert len(stored) == images and not any(p.startswith("/") for p in stored)
        assert bundle_path == "chest-cam/1"

        rules = tmp_path / "rules.yaml"
        rules.write_text("rules:\n  - {name: c, match: {Modality: CR}, models: [chest-cam]}\n")
        ports = {"a": free_port(), "b": free_port(), "sched": free_port()}
        worker_env = {"LIGHTBOX_WORKER_CONCURRENCY": "1", "LIGHTBOX_DECODE_WORKERS": "1",
                      "LIGHTBOX_BATCH_MAX_WAIT_MS": "500", "LIGHTBOX_RULES_FILE": str(rules)}
        procs.append(_spawn({**env_a, **worker_env, "LIGHTBOX_METRICS_PORT": str(ports["a"])},
                            node_a, tmp_path / "worker-a.log", "worker"))
        procs.append(_spawn({**env_b, **worker_env, "LIGHTBOX_METRICS_PORT": str(ports["b"])},
                            node_b, tmp_path / "worker-b.log", "worker"))
        for node in ("a", "b"):  # ready = models loaded, database and Redis answer
            wait_for(lambda n=node: _get(f"http://127.0.0.1:{ports[n]}/readyz")[0] == 200,
                     300, what=f"worker {node} ready")
        procs.append(_spawn({**env_a, "LIGHTBOX_RULES_FILE": str(rules),
                             "LIGHTBOX_QUIET_SECONDS": "0",
                             "LIGHTBOX_METRICS_PORT": str(ports["sched"])},
                            node_a, tmp_path / "scheduler.log", "scheduler"))

        def finished() -> list[Job] | None:
            with session_scope(settings_a.sqlalchemy_url) as session:
                jobs = list(session.scalars(select(Job)))
            done = len(jobs) == len(studies) and all(
                j.state == JobState.succeeded for j in jobs)
            return jobs if done else None
        jobs = wait_for(finished, 600, what="every job succeeded on the two workers")
        assert len({j.worker for j in jobs}) == 2  # both nodes ran jobs

        # Metrics of each process: the workers' images add up, the scheduler sees the jobs.
        worker_text = [_get(f"http://127.0.0.1:{ports[n]}/metrics")[1] for n in ("a", "b")]
        assert sum(_metric(t, "lightbox_images_processed_total", model="chest-cam")
                   for t in worker_text) == images
        assert all(_metric(t, "lightbox_worker_stage_seconds_count", stage="inference") > 0
                   for t in worker_text)
        assert all(_metric(t, "lightbox_received_to_finding_seconds_count") >= 1
                   for t in worker_text)
        sched = _get(f"http://127.0.0.1:{ports['sched']}/metrics")[1]
        assert _metric(sched, "lightbox_jobs", state="succeeded") == len(studies)
        assert 'lightbox_queue_depth{priority="stat"}' in sched
        assert _get(f"http://127.0.0.1:{ports['sched']}/readyz")[0] == 200

        # Node C builds the results: every heatmap written by A or B is found there.
        dest = json.dumps([{"name": "pacs", "type": "dicom", "ae_title": "PACS",
                            "host": "127.0.0.1", "port": free_port()}])
        exported = subprocess.run([*CLI, "export", "--once"], cwd=node_c, capture_output=True,
                                  text=True, env={**env_c, "LIGHTBOX_EXPORT_DESTINATIONS": dest,
                                                  "LIGHTBOX_EXPORT_TIMEOUT": "2"}, timeout=600)
        assert exported.returncode == 0, exported.stderr
        assert "no heatmap" not in exported.stderr
        with session_scope(settings_a.sqlalchemy_url) as session:
            rows = list(session.scalars(select(Export)))
        sc = [r for r in rows if r.kind == "sc"]
        assert len(sc) == images and len([r for r in rows if r.kind == "sr"]) == len(studies)
        for row in rows:
            assert row.path and not row.path.startswith("/")
            assert pydicom.dcmread(node_c / "mnt" / "storage" / row.path).SOPInstanceUID
    finally:
        stop_processes(procs)
        for mount_point in (node_b / "mnt", node_c / "mnt"):
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


# -- 4. graceful stop --------------------------------------------------------------------------

@pytest.mark.slow  # processes (nodes, signals) are the point
def test_sigterm_worker_finishes_in_flight_jobs_and_exits_0(sqlite_backend: Backend,
                                                             model_bundle: Path,
                                                             tmp_path: Path) -> None:
    """SIGTERM while jobs run: they finish and commit, the worker exits 0, the jobs it had not
    started stay queued for the next worker; no job lost, none run twice, no finding doubled."""
    settings = sqlite_backend.settings.model_copy(update={"quiet_seconds": 0.0})
    with session_scope(settings.sqlalchemy_url) as session:
        register_bundle(session, model_bundle, promote=True)
    rng = np.random.default_rng(4)
    studies = [write_study(tmp_path / f"s{i}", rng, label=1, images=2) for i in range(6)]
    for study in studies:
        for path in study.paths:
            register_file(settings, path)
    dispatch_ready(settings, load_rules(), PassReport())
    send_pending(settings, make_celery(settings), PassReport())
    # A long batch wait keeps every job in flight for seconds: SIGTERM lands mid-job.
    env = {**sqlite_backend.env, "LIGHTBOX_WORKER_CONCURRENCY": "2",
           "LIGHTBOX_BATCH_MAX_WAIT_MS": "4000", "LIGHTBOX_DECODE_WORKERS": "1"}

    def states() -> dict[int, JobState]:
        with session_scope(settings.sqlalchemy_url) as session:
            return dict(session.execute(select(Job.id, Job.state)).all())

    first = _spawn(env, tmp_path, tmp_path / "worker-1.log", "worker")
    try:
        running = wait_for(lambda: [j for j, s in states().items() if s == JobState.running],
                           300, interval=0.05, what="a job in flight")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 0
    finally:
        stop_processes([first])
    after = states()
    assert all(after[j] == JobState.succeeded for j in running)  # finished and committed
    assert JobState.running not in after.values()
    assert JobState.queued in after.values()  # the rest waits for the next worker
    second = _spawn(env, tmp_path, tmp_path / "worker-2.log", "worker")
    try:
        wait_for(lambda: set(states().values()) == {JobState.succeeded}, 300,
                 what="every job succeeded after the restart")
    finally:
        stop_processes([second])
    with session_scope(settings.sqlalchemy_url) as session:
        attempts = list(session.scalars(select(Job.attempts)))
        per_job = dict(session.execute(select(Finding.job_id, func.count())
                                       .group_by(Finding.job_id)).all())
    assert attempts == [1] * len(studies)  # none ran twice
    assert sorted(per_job.values()) == [2] * len(studies)  # none lost, none doubled


@pytest.mark.slow  # processes (nodes, signals) are the point
def test_scp_api_export_serve_probes_and_stop_cleanly(sqlite_backend: Backend,
                                                      tmp_path: Path) -> None:
    """Each long-running PACS process serves its probes and metrics; on SIGTERM the SCP
    registers everything it acknowledged (the spool drained), and all three exit 0."""
    storescu = shutil.which("storescu")
    if storescu is None:
        pytest.skip("dcmtk storescu is not installed (.ci/run installs it)")
    settings = sqlite_backend.settings
    ports = {name: free_port() for name in ("scp", "scp-metrics", "api", "export-metrics")}
    base = {**sqlite_backend.env, "LIGHTBOX_METRICS_BIND_ADDRESS": "127.0.0.1"}
    scp = _spawn({**base, "LIGHTBOX_SCP_PORT": str(ports["scp"]),
                  "LIGHTBOX_SCP_BIND_ADDRESS": "127.0.0.1", "LIGHTBOX_SCP_ALLOWED_CALLERS": "*",
                  "LIGHTBOX_METRICS_PORT": str(ports["scp-metrics"])},
                 tmp_path, tmp_path / "scp.log", "scp")
    api = _spawn({**base, "LIGHTBOX_API_TOKEN": "t0ken", "LIGHTBOX_API_PORT": str(ports["api"])},
                 tmp_path, tmp_path / "api.log", "api")
    export = _spawn({**base, "LIGHTBOX_METRICS_PORT": str(ports["export-metrics"])},
                    tmp_path, tmp_path / "export.log", "export")
    procs = [scp, api, export]
    try:
        urls = {"scp": f"http://127.0.0.1:{ports['scp-metrics']}",
                "api": f"http://127.0.0.1:{ports['api']}",
                "export": f"http://127.0.0.1:{ports['export-metrics']}"}
        for name, url in urls.items():  # the SCP is ready once it listens
            wait_for(lambda u=url: _get(f"{u}/readyz")[0] == 200, 180, what=f"{name} ready")
            assert _get(f"{url}/healthz") == (200, "ok\n")
        study = write_study(tmp_path / "in", np.random.default_rng(7), label=1, images=6)
        sent = subprocess.run([storescu, "-aet", "MODALITY", "-aec", "LIGHTBOX", "127.0.0.1",
                               str(ports["scp"]), *map(str, study.paths)],
                              env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True,
                              text=True, timeout=300)
        assert sent.returncode == 0, sent.stderr
        metrics_text = _get(f"{urls['scp']}/metrics")[1]
        assert _metric(metrics_text, "lightbox_cstore_total", status="success") == 6
        api_metrics = _get(f"{urls['api']}/metrics")[1]
        assert 'lightbox_jobs{state="queued"}' in api_metrics
        for proc in procs:  # at once: the SCP's registrar may still hold acknowledged files
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=180) for proc in procs] == [0, 0, 0]
    finally:
        stop_processes(procs)
    with session_scope(settings.sqlalchemy_url) as session:
        uids = set(session.scalars(select(Instance.sop_instance_uid)))
    assert uids == set(study.sop_instance_uids)  # every acknowledged instance registered
    waiting = [p for p in (settings.storage_dir / ".spool").rglob("slot-*") if p.stat().st_size]
    assert waiting == []  # no acknowledged instance left in the spool


def test_gpu_metrics_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU utilisation and memory come from nvidia-ml-py; no GPU here, so NVML is a stand-in
    (mocks only for GPUs), and without it no GPU metric is registered at all."""
    import types

    from lightbox import metrics

    if importlib.util.find_spec("pynvml") is None:
        assert metrics.register_gpu_collector() is False
    fake = types.ModuleType("pynvml")
    fake.NVMLError = RuntimeError  # type: ignore[attr-defined]
    fake.nvmlInit = lambda: None  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUtilizationRates = (  # type: ignore[attr-defined]
        lambda h: types.SimpleNamespace(gpu=40 + h))
    fake.nvmlDeviceGetMemoryInfo = (  # type: ignore[attr-defined]
        lambda h: types.SimpleNamespace(used=(h + 1) * 2**30, total=141 * 2**30))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    samples = {(s.name, s.labels["gpu"]): s.value
               for family in metrics.GpuCollector().collect() for s in family.samples}
    assert samples[("lightbox_gpu_utilization_ratio", "1")] == pytest.approx(0.41)
    assert samples[("lightbox_gpu_memory_used_bytes", "0")] == 2**30
    assert samples[("lightbox_gpu_memory_total_bytes", "1")] == 141 * 2**30
