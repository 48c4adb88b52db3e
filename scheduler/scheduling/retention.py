"""Retention: stored pixels are deleted after ``LIGHTBOX_RETENTION_DAYS``; findings, rows and
events are kept (the PACS keeps the images; Lightbox keeps what it concluded).

Only instances of studies at rest are deleted: not receiving, and with no job that may still
need the pixels (queued, running or failed-waiting-to-retry). The rows are committed with
``stored_path`` NULL before the files are unlinked, so a crash in between leaves an orphan
file, never a row that points at nothing. One ``pixels_deleted`` event per batch.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta, timezone

from sqlalchemy import exists, select

from db.locking import skip_locked
from db.models import Event, Instance, Job, JobState, Series, Study, StudyStatus
from db.session import session_scope
from lightbox.roots import stored_file
from lightbox.settings import Settings

log = logging.getLogger(__name__)
BATCH = 500
OPEN_STATES = (JobState.queued, JobState.running, JobState.failed)


def delete_expired_pixels(settings: Settings, now: datetime | None = None) -> int:
    """Delete stored files older than the retention age. Returns how many were deleted."""
    if settings.retention_days is None:
        return 0
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=settings.retention_days)
    total = 0
    while True:
        with session_scope(settings.sqlalchemy_url) as session:
            open_job = exists().where(Job.study_id == Series.study_id, Job.state.in_(OPEN_STATES))
            query = (select(Instance)
                     .join(Series, Instance.series_id == Series.id)
                     .join(Study, Series.study_id == Study.id)
                     .where(Instance.stored_path.is_not(None), Instance.received_at < cutoff,
                            Study.status != StudyStatus.receiving, ~open_job)
                     .order_by(Instance.id).limit(BATCH))
            instances = list(session.scalars(skip_locked(session, query, of=Instance)))
            if not instances:
                return total
            paths = [stored_file(settings, i.stored_path) for i in instances if i.stored_path]
            for instance in instances:
                instance.stored_path = None
            session.add(Event(kind="pixels_deleted", detail={
                "instances": len(instances), "cutoff": cutoff.isoformat(),
                "retention_days": settings.retention_days}))
        for path in paths:  # after the commit: see the module docstring
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("retention could not delete a stored file: %s", exc.strerror or exc)
        total += len(instances)
        log.info("retention: deleted pixels of %d instance(s) received before %s",
                 len(instances), cutoff.isoformat())
