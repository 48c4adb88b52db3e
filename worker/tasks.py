"""The Celery task a worker runs, registered under :data:`lightbox.task_names.PROCESS_JOB`.

Pool choice: ``threads``, concurrency ``LIGHTBOX_WORKER_CONCURRENCY`` (jobs in flight).
- No fork: a CUDA context does not survive fork (a prefork child inherits a broken one), and
  neither does ONNX Runtime's thread pool; with threads, CUDA is initialised lazily in this
  process by the batcher thread that runs the model (:mod:`worker.runtime_tensorrt`).
- One model load per process, shared by every in-flight job, which is what lets images of
  several studies share one runtime call (:mod:`worker.batcher`). Each task thread mostly waits
  (decode happens in spawned processes, inference in the batcher thread, commits in the writer
  thread), so the GIL is not the limit.
- Prefetch: Celery reserves concurrency × ``worker_prefetch_multiplier`` (1) messages, i.e. only
  the jobs it is running; a killed worker strands no more than those (redelivered after the
  visibility timeout; the scheduler requeues them sooner from their stale heartbeats), and a
  STAT job waits at most for one slot, never behind a reserved backlog.
Scale out with more worker processes (one per GPU).
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timezone

from celery import Celery
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from sqlalchemy.exc import InterfaceError, OperationalError

from db.models import WorkerNode
from db.session import session_scope, set_worker_timeouts
from db.upsert import insert_ignore
from lightbox import metrics
from lightbox.celery_app import make_celery
from lightbox.settings import Settings, get_settings
from lightbox.task_names import PROCESS_JOB, QUEUE
from worker.layout import sized_settings
from worker.model_cache import ModelCache, RuntimeLoader
from worker.pipeline import WorkerPipeline
from worker.process import run_job, worker_name
from worker.runtime import choose_runtime, load_runtime

log = logging.getLogger(__name__)


def build_app(settings: Settings,
              loader: RuntimeLoader = load_runtime) -> tuple[Celery, WorkerPipeline]:
    """The Celery app and the pipeline its task runs. ``loader`` makes each model's runtime
    (:class:`~worker.model_cache.ModelCache`'s extension point; the benchmarks' stand-in
    accelerator comes in through it)."""
    settings = sized_settings(settings)  # auto values sized to the node (worker/layout.py)
    app = make_celery(settings)
    runtime_kind = choose_runtime(settings)
    pipeline = WorkerPipeline(settings, ModelCache(settings, runtime_kind, loader))

    # A database that is down (restart, failover) must not cost the job: the task is retried
    # with backoff instead of being acknowledged with its outcome unrecorded. The outcome lives
    # in the database; a Celery result per job would be a Redis write nobody reads.
    @app.task(name=PROCESS_JOB, acks_late=True, ignore_result=True,
              autoretry_for=(OperationalError, InterfaceError), retry_backoff=True,
              retry_backoff_max=60, max_retries=30)
    def process_job(job_id: int) -> str:
        # Returns only after the job's outcome committed; the message is acked after that.
        return run_job(settings, pipeline, int(job_id))

    return app, pipeline


def _touch_worker(settings: Settings, runtime: str) -> None:
    now = datetime.now(timezone.utc)
    with session_scope(settings.sqlalchemy_url) as session:
        name = worker_name()
        insert_ignore(session, WorkerNode, [{"hostname": name, "runtime": runtime,
                                             "pid": os.getpid(), "started_at": now,
                                             "last_seen_at": now}])
        session.query(WorkerNode).filter(WorkerNode.hostname == name).update(
            {"last_seen_at": now, "runtime": runtime})


def run_worker(settings: Settings | None = None, loglevel: str = "INFO",
               loader: RuntimeLoader = load_runtime) -> None:
    settings = sized_settings(settings or get_settings())
    set_worker_timeouts(settings.worker_db_timeout_seconds)
    app, pipeline = build_app(settings, loader)
    runtime_kind = pipeline.cache.runtime_kind
    stop = threading.Event()

    def presence() -> None:
        while not stop.wait(settings.worker_heartbeat_seconds):
            try:  # the report changes when a model falls back to another runtime
                _touch_worker(settings, pipeline.cache.runtime_report())
            except Exception:  # noqa: BLE001 - presence is advisory
                log.warning("worker presence update failed", exc_info=True)

    @worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        pipeline.warm_up()
        _touch_worker(settings, pipeline.cache.runtime_report())
        metrics.WORKER_RUNTIME.labels(pipeline.cache.runtime_report()).set(1)
        metrics.ready_flag("models").set()
        threading.Thread(target=presence, name="presence", daemon=True).start()
        runners = {batcher.runners for batcher in pipeline.batchers().values()}
        log.info("worker ready: runtime %s, %d job(s) in flight, batches of up to %d "
                 "(wait %.0f ms) on %s runner thread(s) per model, %d decode process(es)",
                 runtime_kind, settings.worker_concurrency, settings.batch_max_size,
                 settings.batch_max_wait_ms, "/".join(map(str, sorted(runners))) or "no",
                 pipeline.decoder.workers)

    @worker_shutting_down.connect(weak=False)
    def _stopping(**_: object) -> None:
        # SIGTERM: Celery stops taking messages and waits for the jobs in flight (they finish
        # and commit; prefetched, unstarted messages go back to Redis). The grace period is the
        # pod's terminationGracePeriodSeconds: past it, exit anyway; a job still running then
        # is requeued by the scheduler once its heartbeat is stale, and, being claimed only
        # from `queued`, never runs twice at once.
        metrics.ready_flag("models").clear()
        log.info("stopping: finishing jobs in flight (grace %.0f s)",
                 settings.shutdown_grace_seconds)

        def overdue() -> None:
            log.warning("grace period over with jobs in flight; exiting, the scheduler "
                        "requeues them from their heartbeats")
            logging.shutdown()
            os._exit(0)

        timer = threading.Timer(settings.shutdown_grace_seconds, overdue)
        timer.daemon = True
        timer.start()

    @worker_shutdown.connect(weak=False)
    def _down(**_: object) -> None:
        metrics.ready_flag("models").clear()
        stop.set()
        pipeline.close()

    app.worker_main([
        "worker", "--pool=threads", f"--concurrency={max(1, settings.worker_concurrency)}",
        f"--loglevel={loglevel}", f"--queues={QUEUE}",
        f"--hostname=lightbox-{worker_name().replace(':', '-')}@%h", "--without-gossip",
        "--without-mingle",
    ])
