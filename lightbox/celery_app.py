"""The Celery application. Broker and result backend are Redis (embedded by default).

Delivery settings are chosen for "never lose a study":
- ``task_acks_late``: a job's message is acknowledged only after the task returned, i.e. after
  its findings committed; a worker that dies mid-job leaves the message to be redelivered.
- ``worker_prefetch_multiplier=1``: a worker reserves one message at a time, so a killed worker
  strands at most one job and STAT jobs are not stuck behind a prefetched routine backlog.
- ``visibility_timeout``: Redis redelivers an unacknowledged message after this long; it must
  exceed the longest job (default one hour, ``LIGHTBOX_VISIBILITY_TIMEOUT``). The scheduler's
  database reconciliation does not depend on it.
- Priorities use kombu's Redis priority sub-queues with the "priority" queue order strategy.
"""

from __future__ import annotations

from celery import Celery

from lightbox.redis_server import broker_url
from lightbox.settings import Settings, get_settings
from lightbox.task_names import PRIORITY_ROUTINE, PRIORITY_STEPS, QUEUE


def make_celery(settings: Settings | None = None, start_redis: bool = True) -> Celery:
    settings = settings or get_settings()
    url = broker_url(settings, start=start_redis)
    app = Celery("lightbox", broker=url, backend=url)
    app.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_default_priority=PRIORITY_ROUTINE,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "priority_steps": PRIORITY_STEPS,
            "sep": ":",
            "queue_order_strategy": "priority",
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
    )
    return app
