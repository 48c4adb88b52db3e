"""Registration: the one path by which an instance enters Lightbox (folder ingest today; the
SCP and STOW-RS use it too). Idempotent: the same SOP Instance UID twice gives one row.

Order of work, so that nothing is lost and nothing is half-registered:
1. parse and check the header (bad files → quarantine with reason);
2. copy the bytes into managed storage (atomic rename);
3. one transaction: study, series, instance rows; a study already processed is reopened as a
   new revision;
4. only after the commit is the source removed (watched folders move files, ingest copies).
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Event, Instance, Series, Study, StudyStatus
from db.session import session_scope
from db.upsert import get_or_create
from lightbox.errors import IngestError
from lightbox.settings import Settings
from scheduler.header import Header, read_header
from scheduler.quarantine import quarantine_file
from scheduler.storage import file_sha256, instance_path, store_bytes_atomically

log = logging.getLogger(__name__)


class Outcome(str, enum.Enum):
    registered = "registered"
    duplicate = "duplicate"
    quarantined = "quarantined"


@dataclass(frozen=True)
class RegisterResult:
    outcome: Outcome
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    reason: str | None = None


def _check_path(path: Path, root: Path | None) -> None:
    if path.is_symlink():
        target = path.resolve()
        if root is None or not target.is_relative_to(root.resolve()):
            raise IngestError("symbolic link pointing outside the ingest folder")
    if not path.is_file():
        raise IngestError("not a regular file")
    if path.stat().st_size == 0:
        raise IngestError("empty file (0 bytes)")


def _record(session: Session, header: Header, stored: Path, sha: str, size: int,
            source: str) -> Outcome:
    now = datetime.now(timezone.utc)
    study = get_or_create(session, Study, {"study_instance_uid": header.study_instance_uid})
    series = get_or_create(
        session, Series, {"series_instance_uid": header.series_instance_uid},
        study_id=study.id, modality=header.tags.get("Modality"), tags=header.tags,
    )
    existing = session.scalars(
        select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)
    ).first()
    if existing is not None and existing.sha256 == sha:
        return Outcome.duplicate
    study = session.get(Study, study.id, with_for_update=True) or study
    if study.status != StudyStatus.receiving:
        study.revision += 1
        study.status = StudyStatus.receiving
        session.add(Event(kind="study_reopened", study_instance_uid=study.study_instance_uid,
                          detail={"revision": study.revision,
                                  "sop_instance_uid": header.sop_instance_uid}))
    study.last_received_at = now
    if existing is not None:  # same UID, new content: a corrected instance
        existing.sha256, existing.size_bytes, existing.stored_path = sha, size, str(stored)
        existing.study_revision, existing.received_at = study.revision, now
        return Outcome.registered
    session.add(Instance(
        series_id=series.id, sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid, transfer_syntax_uid=header.transfer_syntax_uid,
        stored_path=str(stored), size_bytes=size, sha256=sha, rows=header.rows,
        columns=header.columns, study_revision=study.revision, received_at=now, source=source,
    ))
    return Outcome.registered


def register_file(settings: Settings, path: Path, *, source: str = "folder", move: bool = False,
                  root: Path | None = None) -> RegisterResult:
    """Register one file. Never raises for bad input: such files are quarantined."""
    url = settings.sqlalchemy_url
    try:
        _check_path(path, root)
        header = read_header(path)
    except IngestError as exc:
        with session_scope(url) as session:
            quarantine_file(settings, session, path, code=exc.code, reason=str(exc), move=move)
        return RegisterResult(Outcome.quarantined, reason=str(exc))
    stored = instance_path(settings.storage_dir, header.study_instance_uid,
                           header.series_instance_uid, header.sop_instance_uid)
    sha, size = file_sha256(path)
    if not (stored.exists() and file_sha256(stored)[0] == sha):
        store_bytes_atomically(path, stored)
    with session_scope(url) as session:
        outcome = _record(session, header, stored, sha, size, source)
    if move:
        os.unlink(path)
    log.info("%s %s (study %s)", outcome.value, header.sop_instance_uid,
             header.study_instance_uid)
    return RegisterResult(outcome, header.sop_instance_uid, header.study_instance_uid)
