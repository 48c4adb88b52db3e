"""The Celery task a worker runs, registered under :data:`lightbox.tasks.PROCESS_JOB`.

Pool choice: ``solo`` — one process, one job at a time, no fork. CUDA contexts do not survive
fork (a prefork child inherits a broken context), ONNX Runtime and TensorRT already use every
core inside one call, and a model should be loaded once per process, not once per child.
Scale out by running more worker processes (one per GPU).
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timezone

from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from sqlalchemy.exc import InterfaceError, OperationalError

from db.models import WorkerNode
from db.session import session_scope
from db.upsert import insert_ignore
from lightbox.celery_app import make_celery
from lightbox.settings import Settings, get_settings
from lightbox.tasks import PROCESS_JOB, QUEUE
from worker.model_cache import ModelCache
from worker.process import run_job, worker_name
from worker.runtime import choose_runtime

log = logging.getLogger(__name__)


def build_app(settings: Settings) -> tuple[Celery, ModelCache]:
    app = make_celery(settings)
    runtime_kind = choose_runtime(settings)
    cache = ModelCache(settings, runtime_kind)

    # A database that is down (restart, failover) must not cost the job: the task is retried
    # with backoff instead of being acknowledged with its outcome unrecorded.
    @app.task(name=PROCESS_JOB, acks_late=True, ignore_result=False,
              autoretry_for=(OperationalError, InterfaceError), retry_backoff=True,
              retry_backoff_max=60, max_retries=30)
    def process_job(job_id: int) -> str:
        # Returns only after the job's outcome committed; the message is acked after that.
        return run_job(settings, cache, int(job_id))

    return app, cache


def _touch_worker(settings: Settings, runtime: str) -> None:
    now = datetime.now(timezone.utc)
    with session_scope(settings.sqlalchemy_url) as session:
        name = worker_name()
        insert_ignore(session, WorkerNode, [{"hostname": name, "runtime": runtime,
                                             "pid": os.getpid(), "started_at": now,
                                             "last_seen_at": now}])
        session.query(WorkerNode).filter(WorkerNode.hostname == name).update(
            {"last_seen_at": now, "runtime": runtime})


def run_worker(settings: Settings | None = None, loglevel: str = "INFO") -> None:
    settings = settings or get_settings()
    app, cache = build_app(settings)
    stop = threading.Event()

    def presence() -> None:
        while not stop.wait(settings.worker_heartbeat_seconds):
            try:
                _touch_worker(settings, cache.runtime_kind)
            except Exception:  # noqa: BLE001 - presence is advisory
                log.warning("worker presence update failed", exc_info=True)

    @worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        _touch_worker(settings, cache.runtime_kind)
        threading.Thread(target=presence, name="presence", daemon=True).start()

    @worker_shutdown.connect(weak=False)
    def _down(**_: object) -> None:
        stop.set()

    app.worker_main([
        "worker", "--pool=solo", f"--loglevel={loglevel}", f"--queues={QUEUE}",
        f"--hostname=lightbox-{worker_name().replace(':', '-')}@%h", "--without-gossip",
        "--without-mingle",
    ])
