"""The test harness itself: its own Redis, and PostgreSQL variants that skip (or fail on CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.conftest import Backend

ROOT = Path(__file__).resolve().parents[1]


def test_postgres_backend_uses_this_runs_own_redis(postgres_backend: Backend,
                                                  test_redis: str) -> None:
    assert postgres_backend.broker_url.startswith(f"{test_redis}/")
    port = redis.Redis.from_url(postgres_backend.broker_url).connection_pool \
        .connection_kwargs["port"]
    assert port != 6379  # never the shared server's databases
    client = redis.Redis.from_url(postgres_backend.broker_url)
    assert client.dbsize() == 0  # flushed for this test: it is ours


def test_sqlite_backend_starts_from_the_migrated_copy(sqlite_backend: Backend) -> None:
    from db.migrate import current_revision

    assert current_revision(sqlite_backend.settings.sqlalchemy_url)


def _run_one_postgres_test(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         "tests/test_harness.py::test_postgres_backend_uses_this_runs_own_redis"],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_unreachable_postgres_skips_with_the_reason_but_fails_under_ci() -> None:
    closed = "postgresql+psycopg://postgres@127.0.0.1:1/test"
    laptop = _run_one_postgres_test(LIGHTBOX_TEST_POSTGRES_URL=closed, CI="false")
    assert laptop.returncode == 0, laptop.stdout[-2000:]
    assert "1 skipped" in laptop.stdout and "PostgreSQL not reachable" in laptop.stdout
    ci = _run_one_postgres_test(LIGHTBOX_TEST_POSTGRES_URL=closed, CI="true")
    assert ci.returncode != 0 and "CI=true" in ci.stdout, ci.stdout[-2000:]
