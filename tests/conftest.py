"""Shared fixtures: real backends and one trained model.

Two backends, both real: ``sqlite`` (a SQLite file and the embedded Redis in a temp data dir)
and ``postgres`` (a fresh PostgreSQL database and a Redis database index on the external
servers; .ci/run starts them). URLs of the external servers can be overridden with
``LIGHTBOX_TEST_POSTGRES_URL`` and ``LIGHTBOX_TEST_REDIS_URL``.
"""

from __future__ import annotations

import os
import random
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
from db.registry import register_bundle
from db.session import session_scope
from lightbox.redis_server import ensure_embedded_redis, stop_embedded_redis
from lightbox.settings import Settings

PG_ADMIN_URL = os.environ.get(
    "LIGHTBOX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
EXTERNAL_REDIS = os.environ.get("LIGHTBOX_TEST_REDIS_URL", "redis://127.0.0.1:6379")


@dataclass
class Backend:
    name: str
    settings: Settings
    env: dict[str, str]
    broker_url: str

    def spawn(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        """Start a real `lightbox` process against this backend."""
        with log.open("ab") as handle:  # the child keeps its own copy
            return subprocess.Popen([sys.executable, "-m", "lightbox.cli", *args],
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


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A migrated data dir (SQLite) shared by one test module's trainer and registry tests."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("lightbox-data"))
    upgrade(settings.sqlalchemy_url)
    return settings


@pytest.fixture(scope="session")
def model_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One seed-CNN bundle trained (quickly) on synthetic data, shared by all tests."""
    from trainer.train import train_seed_cnn

    settings = Settings(data_dir=tmp_path_factory.mktemp("model-data"))
    upgrade(settings.sqlalchemy_url)
    result = train_seed_cnn(settings, name="chest", images=240, epochs=3, seed=0)
    return Path(result.bundle_dir)


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Iterator[Backend]:
    settings = Settings(data_dir=tmp_path / "data", quiet_seconds=1.0)
    upgrade(settings.sqlalchemy_url)
    url = ensure_embedded_redis(settings)
    yield Backend("sqlite", settings, _env(settings), url)
    stop_embedded_redis(settings)


def _lease_redis_db() -> int:
    """A Redis database index no other concurrently running test session is using.

    Leases are keys in database 0 that expire, so a crashed session frees its index."""
    lease = redis.Redis.from_url(f"{EXTERNAL_REDIS}/0")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for index in random.sample(range(1, 16), 15):
            if lease.set(f"lightbox-test-lease:{index}", os.getpid(), nx=True, ex=1800):
                return index
        time.sleep(0.5)
    raise RuntimeError("no free Redis database index for the test (all 15 leased)")


@pytest.fixture
def postgres_backend(tmp_path: Path) -> Iterator[Backend]:
    name = f"lightbox_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    db_url = sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    redis_db = _lease_redis_db()
    redis_url = f"{EXTERNAL_REDIS}/{redis_db}"
    redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(data_dir=tmp_path / "data", quiet_seconds=1.0, database_url=db_url,
                        redis_url=redis_url)
    upgrade(settings.sqlalchemy_url)
    yield Backend("postgres", settings, _env(settings), redis_url)
    from db.session import sessionmaker_for

    sessionmaker_for(db_url).kw["bind"].dispose()
    redis.Redis.from_url(redis_url).flushdb()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
    redis.Redis.from_url(f"{EXTERNAL_REDIS}/0").delete(f"lightbox-test-lease:{redis_db}")


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
