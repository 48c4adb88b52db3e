"""What the commands add to :mod:`lightbox.metrics`: the system-wide gauges read from the
database and Redis at scrape time, and the readiness checks of each long-running command. Here,
in the command layer, because they reach into the database component."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING

import click
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lightbox.errors import ConfigurationError
from lightbox.metrics import (
    Check,
    flag_check,
    readiness,
    ready_flag,
    redis_check,
    register_once,
    serve_probes,
)
from lightbox.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

# lightbox.task_names.queue_keys() lists the STAT list first, then the routine one.
PRIORITY_NAMES = {0: "stat", 1: "routine"}


class SystemCollector(Collector):
    """Jobs by state and queue depth per priority, read when scraped (no polling loop)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("lightbox_jobs", "Jobs by state (database).", labels=["state"])
        try:
            from sqlalchemy import func, select

            from db.models import Job, JobState
            from db.session import session_scope

            with session_scope(self.settings.sqlalchemy_url) as session:
                counts = dict(session.execute(
                    select(Job.state, func.count()).group_by(Job.state)).all())
            for state in JobState:
                jobs.add_metric([state.value], float(counts.get(state, 0)))
        except Exception:  # noqa: BLE001 - a scrape must answer; /readyz says what is down
            log.debug("jobs by state unavailable", exc_info=True)
        yield jobs
        depth = GaugeMetricFamily("lightbox_queue_depth", "Messages waiting in Redis, by "
                                  "priority list.", labels=["priority"])
        try:
            from lightbox.redis_server import broker_url, redis_client
            from lightbox.task_names import queue_keys

            client = redis_client(broker_url(self.settings, start=False))
            for index, key in enumerate(queue_keys()):
                depth.add_metric([PRIORITY_NAMES.get(index, str(index))],
                                 float(client.llen(key)))
        except Exception:  # noqa: BLE001 - as above
            log.debug("queue depth unavailable", exc_info=True)
        yield depth


def database_check(settings: Settings) -> Check:
    def check() -> None:
        from sqlalchemy import text

        from db.session import sessionmaker_for

        with sessionmaker_for(settings.sqlalchemy_url).kw["bind"].connect() as conn:
            conn.execute(text("SELECT 1"))
    return check


def base_checks(settings: Settings) -> dict[str, Check]:
    """What every command needs: its database and Redis answer."""
    return {"database": database_check(settings), "redis": redis_check(settings)}


def start_probes(settings: Settings, extra: dict[str, Check] | None = None, *,
                 system: bool = False) -> ThreadingHTTPServer | None:
    """Serve this command's probes on ``LIGHTBOX_METRICS_PORT`` (0: off). ``system``: also
    the jobs-by-state and queue-depth gauges (the scheduler and the API export them)."""
    if system:
        register_once("system", SystemCollector(settings))
    try:
        return serve_probes(settings, {**base_checks(settings), **(extra or {})})
    except ConfigurationError as exc:  # one line naming the variable, not a traceback
        raise click.ClickException(str(exc)) from exc


def worker_checks() -> dict[str, Check]:
    return {"models": flag_check(ready_flag("models"), "models not loaded yet (or stopping)")}


def scp_checks() -> dict[str, Check]:
    return {"listening": flag_check(ready_flag("listening"), "not listening (starting or "
                                    "stopping)")}


def add_probe_routes(app: FastAPI, settings: Settings) -> None:
    """`lightbox api` serves /metrics, /healthz and /readyz beside the API, on its own port
    (no second listener to configure)."""
    from fastapi.responses import PlainTextResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
    from starlette.concurrency import run_in_threadpool

    register_once("system", SystemCollector(settings))
    checks = base_checks(settings)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:  # sync: scraping reads the database, off the event loop
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> PlainTextResponse:
        ok, text = await run_in_threadpool(readiness, checks)
        return PlainTextResponse(text, status_code=200 if ok else 503)
