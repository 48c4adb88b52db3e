"""Findings written per batch: every job that finished together commits in ONE transaction.

Group commit: job threads hand their rows to :class:`ResultWriter` and block until the commit
that contains them went through; the writer thread takes everything queued at that moment and
writes it with one bulk insert and one commit. While one commit is in flight the next group
gathers, so under load the commit rate is independent of the job rate, and with no load a
lone job is written at once (no added delay).

Each job's part of the transaction is the same as before: lock the job row, delete what this
job wrote before (a redelivered message), insert, mark older revisions' findings superseded,
``succeed``, plus one ``inference_batches`` event naming the runtime batches its images ran in.
If a group's transaction fails, each job is retried alone so that one job's bad row cannot
fail the others; a database outage (``OperationalError``) reaches every job's task, which
Celery retries — a job's message is never acknowledged without its outcome recorded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from db import jobs as job_states
from db.models import Event, Finding, Job, Model
from db.session import session_scope
from lightbox import metrics
from lightbox.settings import Settings

log = logging.getLogger(__name__)
MAX_GROUP = 64


@dataclass
class JobResult:
    job_id: int
    rows: list[dict[str, Any]]
    batches: list[dict[str, Any]] = field(default_factory=list)  # {"id", "size", "jobs"}


def write_group(settings: Settings, results: Sequence[JobResult]) -> None:
    """One transaction for all ``results``: replace, bulk insert, supersede, succeed."""
    with session_scope(settings.sqlalchemy_url) as session:
        jobs = []
        for result in sorted(results, key=lambda r: r.job_id):  # one lock order: no deadlocks
            job = session.get(Job, result.job_id, with_for_update=True)
            if job is None:
                raise LookupError(f"job {result.job_id} vanished")
            jobs.append(job)
        ids = [r.job_id for r in results]
        session.execute(delete(Finding).where(Finding.job_id.in_(ids)))
        rows = [row for r in results for row in r.rows]
        if rows:
            session.execute(insert(Finding), rows)
        for job in jobs:
            if job.study_revision > 1:  # revision 1 has no older findings to supersede
                model_name = session.scalar(select(Model.name).where(Model.id == job.model_id))
                older = select(Job.id).join(Model, Job.model_id == Model.id).where(
                    Job.study_id == job.study_id, Job.study_revision < job.study_revision,
                    Model.name == model_name)
                session.execute(
                    update(Finding).where(Finding.job_id.in_(older)).values(superseded=True))
            job_states.succeed(session, job)
        events = [{"kind": "inference_batches", "job_id": r.job_id,
                   "detail": {"batches": r.batches}} for r in results if r.batches]
        if events:
            session.execute(insert(Event), events)


def write_results(settings: Settings, job_id: int, rows: list[dict[str, Any]]) -> None:
    """One job's findings and success in one transaction (the group of one)."""
    write_group(settings, [JobResult(job_id, rows)])


@dataclass
class _Queued:
    result: JobResult
    done: Future[None] = field(default_factory=Future)


class ResultWriter:
    """``commit(result)`` returns once the result is committed (or raises why it was not)."""

    def __init__(self, settings: Settings, max_group: int = MAX_GROUP) -> None:
        self.settings, self.max_group = settings, max_group
        self._queue: queue.Queue[_Queued | None] = queue.Queue()
        self.commits = 0
        self.jobs_written = 0
        self._thread = threading.Thread(target=self._loop, name="result-writer", daemon=True)
        self._thread.start()

    def commit(self, result: JobResult, timeout: float | None = None) -> None:
        queued = _Queued(result)
        self._queue.put(queued)
        queued.done.result(timeout=timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group, stop = [first], False
            while len(group) < self.max_group:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                group.append(item)
            self._write(group)
            if stop:
                return

    def _write(self, group: list[_Queued]) -> None:
        started = time.perf_counter()
        try:
            write_group(self.settings, [q.result for q in group])
        except Exception as exc:  # noqa: BLE001 - decided per job below
            if len(group) == 1 or isinstance(exc, (OperationalError, InterfaceError)):
                for queued in group:
                    queued.done.set_exception(exc)
                return
            log.warning("group commit of %d jobs failed (%s); writing them one by one",
                        len(group), type(exc).__name__)
            for queued in group:
                self._write([queued])
            return
        metrics.STAGE_SECONDS.labels("commit").observe(time.perf_counter() - started)
        self.commits += 1
        self.jobs_written += len(group)
        for queued in group:
            queued.done.set_result(None)
