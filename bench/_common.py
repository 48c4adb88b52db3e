"""Shared benchmark plumbing: a throw-away Lightbox installation, processes, output.

Every benchmark prints one JSON document, then a one-line summary, and writes a PNG plot
(matplotlib, Agg) next to a JSON copy under ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import psutil  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from lightbox.redis_server import ensure_embedded_redis, stop_embedded_redis  # noqa: E402
from lightbox.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results"


def machine() -> dict[str, Any]:
    """Where the figures come from, with the load average: on a shared machine other work
    competes for the same cores, and a figure taken under load must say so."""
    return {"cpu_cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or "unknown",
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}


@contextmanager
def installation(data_dir: Path, *, database_url: str | None = None,
                 redis_url: str | None = None) -> Iterator[tuple[Settings, dict[str, str]]]:
    """Settings and a child-process environment for a fresh Lightbox in ``data_dir``
    (embedded SQLite + Redis unless URLs are given)."""
    settings = Settings(data_dir=data_dir, database_url=database_url, redis_url=redis_url,
                        quiet_seconds=0.0)
    upgrade(settings.sqlalchemy_url)
    if redis_url is None:
        ensure_embedded_redis(settings)
    env = dict(os.environ)
    env.update({"LIGHTBOX_DATA_DIR": str(settings.data_path), "LIGHTBOX_QUIET_SECONDS": "0",
                "LIGHTBOX_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)})
    for key, value in (("DATABASE_URL", database_url), ("REDIS_URL", redis_url)):
        if value:
            env[f"LIGHTBOX_{key}"] = value
        else:
            env.pop(f"LIGHTBOX_{key}", None)
    try:
        yield settings, env
    finally:
        if redis_url is None:
            stop_embedded_redis(settings)


def dispatch_all(settings: Settings) -> None:
    """Scheduler passes until every ready study is dispatched (a pass takes at most
    ``scheduler.scheduling.dispatch.BATCH``)."""
    from scheduler.scheduling.dispatch import PassReport, dispatch_ready
    from scheduler.scheduling.route import load_rules

    rules = load_rules(settings.rules_file)
    while True:
        report = PassReport()
        dispatch_ready(settings, rules, report)
        if not report.studies_dispatched and not report.studies_unrouted:
            return


def send_all(settings: Settings) -> None:
    """The scheduler's outbox until every job is sent (a pass sends at most ``BATCH``)."""
    from lightbox.celery_app import make_celery
    from scheduler.scheduling.dispatch import PassReport, send_pending

    app = make_celery(settings)
    while True:
        report = PassReport()
        send_pending(settings, app, report)
        if not report.jobs_sent:
            return


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen([sys.executable, *args], env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05, proc: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) while waiting for {what}")
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children (decode processes included)."""
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def emit(name: str, result: dict[str, Any], summary: str, out_dir: Path,
         plot: Callable[[plt.Figure], None]) -> None:
    """Print the JSON and the one-line summary; write ``<name>.json`` and ``<name>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "machine": machine(), **result}
    figure = plt.figure(figsize=(9, 5))
    plot(figure)
    figure.tight_layout()
    png = out_dir / f"{name}.png"
    figure.savefig(png, dpi=110)
    plt.close(figure)
    result["plot"] = str(png)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(summary)
