"""Shared fixtures: real backends and one trained model.

Two backends, both real: ``sqlite`` (a SQLite file and the embedded Redis in a temp data dir)
and ``postgres`` (a fresh PostgreSQL database on the PostgreSQL server and a Redis database on
this test run's own Redis server). The PostgreSQL server's URL can be overridden with
``LIGHTBOX_TEST_POSTGRES_URL``. When it cannot be reached the PostgreSQL variants are skipped
with the reason, except under ``CI=true``, where they fail.

Fast by construction: the schema is migrated once per session, into a SQLite file that every
SQLite backend copies and into a PostgreSQL template database that every PostgreSQL backend is
created from (``CREATE DATABASE ... TEMPLATE``). The test run starts one ``redis-server`` of its
own on a free port and never touches another Redis. Tests that start processes for the sake of
processes (demo, faults, Orthanc, training, kills) carry the ``slow`` marker: the README's test
command deselects them and ``.ci/run`` runs them after it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from db.migrate import upgrade
from db.model_registry import register_bundle
from db.session import session_scope
from lightbox.redis_server import ensure_embedded_redis, stop_embedded_redis
from lightbox.settings import Settings

PG_ADMIN_URL = os.environ.get(
    "LIGHTBOX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
DB_FILE = "lightbox.db"  # the SQLite file's name in a data dir (Settings.sqlalchemy_url)


@dataclass
class Backend:
    name: str
    settings: Settings
    env: dict[str, str]
    broker_url: str

    def spawn(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        """Start a real `lightbox` process against this backend."""
        with log.open("ab") as handle:  # the child keeps its own copy
            return subprocess.Popen([sys.executable, "-m", "cli.main", *args],
                                    env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True)


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "LIGHTBOX_DATA_DIR": str(settings.data_path),
        "LIGHTBOX_QUIET_SECONDS": str(settings.quiet_seconds),
        "LIGHTBOX_SCHEDULER_INTERVAL": "0.3",
        "LIGHTBOX_WATCH_SETTLE_SECONDS": "0.3",
        "LIGHTBOX_WATCH_RESCAN_SECONDS": "2",
        "LIGHTBOX_WORKER_HEARTBEAT_SECONDS": "1",
        "LIGHTBOX_ONNX_THREADS": "1",
    })
    for key in ("database_url", "redis_url"):
        value = getattr(settings, key)
        if value:
            env[f"LIGHTBOX_{key.upper()}"] = value
        else:
            env.pop(f"LIGHTBOX_{key.upper()}", None)
    return env


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to every head, once per session; data dirs get a copy."""
    path = tmp_path_factory.mktemp("sqlite-template") / DB_FILE
    url = f"sqlite:///{path}"
    upgrade(url)
    from db.session import sessionmaker_for

    sessionmaker_for(url).kw["bind"].dispose()  # no open connection, nothing left in a journal
    return path


def migrated_data_dir(template: Path, data_dir: Path) -> Path:
    """``data_dir`` holding a copy of the migrated SQLite file (what ``upgrade`` would make)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, data_dir / DB_FILE)
    return data_dir


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path) -> Settings:
    """A migrated data dir (SQLite) shared by one test module's trainer and registry tests."""
    return Settings(data_dir=migrated_data_dir(migrated_sqlite,
                                               tmp_path_factory.mktemp("lightbox-data")))


@pytest.fixture(scope="session")
def model_bundle(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path) -> Path:
    """One seed-CNN bundle trained (quickly) on synthetic data, shared by all tests."""
    from trainer.train import train_seed_cnn

    settings = Settings(data_dir=migrated_data_dir(migrated_sqlite,
                                                   tmp_path_factory.mktemp("model-data")))
    result = train_seed_cnn(settings, name="chest", images=240, epochs=3, seed=0)
    return Path(result.bundle_dir)


@pytest.fixture
def sqlite_backend(tmp_path: Path, migrated_sqlite: Path) -> Iterator[Backend]:
    settings = Settings(data_dir=migrated_data_dir(migrated_sqlite, tmp_path / "data"),
                        quiet_seconds=1.0)
    url = ensure_embedded_redis(settings)
    yield Backend("sqlite", settings, _env(settings), url)
    _kill_embedded_redis(settings)


def _kill_embedded_redis(settings: Settings) -> None:
    """SIGKILL the data dir's embedded Redis: its data is thrown away with the temp dir, and a
    graceful stop costs seconds per test (the client's reconnect retries after SHUTDOWN)."""
    import signal

    pidfile = settings.redis_dir / "redis.pid"
    try:
        pid = int(pidfile.read_text().strip())
        if b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass  # no pid file or no /proc: stopped the slow, portable way below
    # Drops this process's use of the data dir (else the last-one-out check runs for every
    # test's data dir at interpreter exit); after the kill it finds no server at once.
    stop_embedded_redis(settings)


@pytest.fixture(scope="session")
def test_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This test run's own ``redis-server`` (no persistence) on a free port: its base URL.
    PostgreSQL backends take its databases 1-15 in turn and flush the one they take; no other
    Redis is touched."""
    from tests.faults.servers import RedisServer, Unavailable

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except Unavailable as exc:
        _unavailable(f"no Redis server for the tests: {exc}")
    yield server.url.rsplit("/", 1)[0]
    server.kill()


_redis_databases = itertools.cycle(range(1, 16))


def _unavailable(reason: str) -> None:
    """Skip (a laptop without the server), or fail under ``CI=true`` (CI must run it)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    """A PostgreSQL database migrated to every head once per session (named per session, since
    several test runs may share the server); every PostgreSQL backend is created from it."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT",
                             connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        _unavailable(f"PostgreSQL not reachable at {sa.make_url(PG_ADMIN_URL).host}:"
                     f"{sa.make_url(PG_ADMIN_URL).port}: {reason}")
    name = f"lightbox_template_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    from db.session import sessionmaker_for

    sessionmaker_for(url).kw["bind"].dispose()  # a template must have no connections
    yield name
    with admin.connect() as conn:
        for spare in [*_pg_spares, name]:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{spare}" WITH (FORCE)'))
    _pg_spares.clear()
    admin.dispose()


@pytest.fixture
def postgres_backend(tmp_path: Path, postgres_template: str, test_redis: str
                     ) -> Iterator[Backend]:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    if _pg_spares:
        name = _pg_spares.pop()
    else:
        name = f"lightbox_test_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"'))
    db_url = sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    redis_url = f"{test_redis}/{next(_redis_databases)}"
    redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(data_dir=tmp_path / "data", quiet_seconds=1.0, database_url=db_url,
                        redis_url=redis_url)
    yield Backend("postgres", settings, _env(settings), redis_url)
    from db.session import sessionmaker_for

    sessionmaker_for(db_url).kw["bind"].dispose()
    redis.Redis.from_url(redis_url).flushdb()
    if _emptied(admin, name, db_url):
        _pg_spares.append(name)  # as fresh as a new copy of the template, for the next test
    else:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


_pg_spares: list[str] = []  # emptied test databases of this session, dropped at its end


def _emptied(admin: sa.Engine, name: str, db_url: str) -> bool:
    """Empty every table (identities restarted) after ending the connections left to the
    database; False when that cannot be done quickly (then the database is dropped)."""
    with admin.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL lock_timeout = '5s'"))
            tables = list(conn.scalars(sa.text(
                "SELECT quote_ident(tablename) FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename <> 'alembic_version'")))
            conn.execute(sa.text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        return True
    except sa.exc.DBAPIError:
        return False
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "postgres":
        request.applymarker(pytest.mark.postgres)
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture
def registered_model(backend: Backend, model_bundle: Path) -> tuple[int, str]:
    """The shared bundle registered and promoted in this backend's database."""
    with session_scope(backend.settings.sqlalchemy_url) as session:
        model = register_bundle(session, model_bundle, promote=True)
        return model.id, model.version


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def run_worker_until_done(backend: Backend, jobs: int, log: Path, what: str = "jobs done",
                          timeout: float = 240) -> None:
    """Start a real `lightbox worker` on ``backend``, wait until ``jobs`` jobs exist and every
    one is in a terminal state, then stop it (its output in ``log``). For tests that send work
    through the real queue; they check the outcomes themselves."""
    from sqlalchemy import select

    from db.models import Job

    def done() -> bool:
        with session_scope(backend.settings.sqlalchemy_url) as session:
            rows = session.scalars(select(Job)).all()
            return len(rows) == jobs and all(j.state.terminal for j in rows)

    worker = backend.spawn("worker", log=log)
    try:
        wait_for(done, timeout=timeout, what=f"{what} ({backend.name})")
    finally:
        stop_processes([worker])


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _CurrentStderr(logging.Handler):
    """Log lines to whatever ``sys.stderr`` is when they are emitted (click's runner swaps it),
    in the order a process would write them beside the command's own error lines."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def run_cli(env: dict[str, str], *args: str, cwd: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
    """``lightbox ARGS`` run in this process (click's runner) with ``env`` as its environment:
    the result of ``subprocess.run([... "-m", "cli.main", *args], env=env, cwd=cwd, text=True,
    capture_output=True)`` without a new interpreter importing everything again. Its log lines
    reach its stderr as in a process (the command's own logging set-up is a no-op under pytest,
    whose handlers the root logger already has), and the umask and the working folder it sets
    are restored. For commands that return (status, results, jobs, models, ingest);
    long-running ones need a process."""
    from click.testing import CliRunner

    from cli.main import main
    from lightbox.logs import LOG_FORMAT
    from lightbox.settings import get_settings

    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    removed = [k for k in os.environ if k.startswith("LIGHTBOX_") and k not in env]
    root, handler = logging.getLogger(), _CurrentStderr()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.getLevelNamesMapping().get(
        env.get("LIGHTBOX_LOG_LEVEL", "INFO").upper(), logging.INFO)))
    umask, folder = os.umask(0o077), Path.cwd()
    os.umask(umask)
    get_settings.cache_clear()
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner(env={**changed, **dict.fromkeys(removed)}).invoke(
            main, list(args), catch_exceptions=True)
    finally:
        get_settings.cache_clear()
        os.chdir(folder)
        os.umask(umask)
        root.removeHandler(handler)
        root.setLevel(level)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["lightbox", *args], result.exit_code, result.stdout,
                                       stderr)


@contextlib.contextmanager
def api_in_thread(settings: Settings) -> Iterator[str]:
    """What `lightbox api` serves (the app, its probe routes) on a free port of 127.0.0.1, by
    uvicorn in a thread of this process: real HTTP without a new interpreter. Its URL. Tests
    whose point is the process (its memory, its signals) start `lightbox api` instead."""
    import socket
    import threading

    import uvicorn

    from cli.commands.probes import add_probe_routes
    from scheduler.web.app import make_app

    app = make_app(settings)
    add_probe_routes(app, settings)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 60, 0.05, "the API started")
        assert server.started, "the API did not start (see the log)"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# Whole modules whose processes are the point (the demo, the fault harness, the Orthanc peer,
# the dashboard in a browser against running processes), and fixtures that train a model
# (``heads``: the fusion heads): their tests carry the ``slow`` marker (see the docstring).
SLOW_MODULES = ("test_demo.py", "test_orthanc.py", "test_dashboard_browser.py", "faults/")
SLOW_FIXTURES = {"trained", "resnet", "heads"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = pytest.mark.slow
    for item in items:
        path = item.path.as_posix()
        if any(path.endswith(m) or f"/{m}" in path for m in SLOW_MODULES) \
                or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(slow)
