"""One heartbeat thread for every job in flight in this worker process.

The scheduler requeues running jobs whose heartbeat is stale, so each in-flight job's
``heartbeat_at`` is touched every ``LIGHTBOX_WORKER_HEARTBEAT_SECONDS``; with many jobs in
flight (batching across studies) one thread and one transaction per beat serve them all.
"""

from __future__ import annotations

import logging
import threading

from db import jobs as job_states
from db.session import session_scope
from lightbox.settings import Settings

log = logging.getLogger(__name__)


class Heartbeats:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._jobs: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, job_id: int) -> None:
        with self._lock:
            self._jobs.add(job_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
                self._thread.start()

    def discard(self, job_id: int) -> None:
        with self._lock:
            self._jobs.discard(job_id)

    def in_flight(self) -> list[int]:
        with self._lock:
            return sorted(self._jobs)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def beat(self) -> None:
        jobs = self.in_flight()
        if not jobs:
            return
        with session_scope(self.settings.sqlalchemy_url) as session:
            for job_id in jobs:
                job_states.heartbeat(session, job_id)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_seconds):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat is not a failed job
                log.warning("heartbeat for jobs %s failed", self.in_flight(), exc_info=True)
