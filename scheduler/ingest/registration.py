"""Registration: the one path by which an instance enters Lightbox (folder ingest, STOW-RS, pull;
the SCP through its spool and :func:`register_received`, the batched form sharing the same
checks and row rules). Idempotent: the same SOP Instance UID twice gives one row.

Order of work, so that nothing is lost and nothing is half-registered:
1. parse and check the header (bad files → quarantine with reason);
2. copy the bytes into managed storage (atomic rename);
3. one transaction: study, series, instance rows; a study already processed is reopened as a
   new revision;
4. only after the commit is the source removed (watched folders move files, ingest copies).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from db.models import Event, Instance, Series, Study, StudyStatus
from db.session import session_scope
from db.upsert import get_or_create
from lightbox.errors import IngestError, StorageFullError
from lightbox.roots import to_storage
from lightbox.settings import Settings
from scheduler.ingest.header import Header, read_header
from scheduler.ingest.instance_identity import same_instance
from scheduler.ingest.quarantine import quarantine_file
from scheduler.ingest.storage import (
    file_sha256,
    fsync_directory,
    instance_path,
    link_into_storage,
    store_bytes_atomically,
)

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


@dataclass(frozen=True)
class Received:
    """An instance whose bytes are durable and whose header passed the checks: what
    :func:`register_received` needs to store and record it."""

    path: Path
    header: Header
    sha256: str
    size: int
    source: str


def _record_batch(session: Session, items: list[tuple[Received, Path]]) -> list[Outcome]:
    """Rows for a batch of checked instances (``(instance, stored path)``) in one transaction.

    Per instance, in order, the rules are those of one instance at a time: the same UID with the
    same bytes is a duplicate (no change); otherwise the study is locked and, when it was
    already processed, reopened as a new revision; a known UID with new bytes is a corrected
    instance (its row is updated). Lookups are made once per study, series and batch, and the
    new instance rows go in with one bulk INSERT (no ORM object per instance: it was most of
    the registrar's CPU, taken from the SCP it shares the node with)."""
    now = datetime.now(timezone.utc)
    studies: dict[str, Study] = {}
    series_rows: dict[str, Series] = {}
    locked: set[str] = set()
    uids = [item.header.sop_instance_uid for item, _ in items]
    existing = {row.sop_instance_uid: row for row in session.scalars(
        select(Instance).where(Instance.sop_instance_uid.in_(uids)))}
    new_rows: dict[str, dict[str, Any]] = {}
    outcomes = []
    for item, stored in items:
        header = item.header
        study = studies.get(header.study_instance_uid)
        if study is None:
            study = get_or_create(session, Study,
                                  {"study_instance_uid": header.study_instance_uid})
            studies[header.study_instance_uid] = study
        series = series_rows.get(header.series_instance_uid)
        if series is None:
            series = get_or_create(
                session, Series, {"series_instance_uid": header.series_instance_uid},
                study_id=study.id, modality=header.tags.get("Modality"), tags=header.tags,
            )
            series_rows[header.series_instance_uid] = series
        current = existing.get(header.sop_instance_uid)
        pending = new_rows.get(header.sop_instance_uid)
        if (current is not None and current.sha256 == item.sha256) or (
                pending is not None and pending["sha256"] == item.sha256):
            outcomes.append(Outcome.duplicate)
            continue
        if header.study_instance_uid not in locked:
            study = session.get(Study, study.id, with_for_update=True) or study
            studies[header.study_instance_uid] = study
            locked.add(header.study_instance_uid)
        if study.status != StudyStatus.receiving:
            study.revision += 1
            study.status = StudyStatus.receiving
            session.add(Event(kind="study_reopened", study_instance_uid=study.study_instance_uid,
                              detail={"revision": study.revision,
                                      "sop_instance_uid": header.sop_instance_uid}))
        study.last_received_at = now
        outcomes.append(Outcome.registered)
        if current is not None:  # same UID, new content: a corrected instance
            current.sha256, current.size_bytes = item.sha256, item.size
            current.stored_path = str(stored)
            current.study_revision, current.received_at = study.revision, now
            continue
        # A new UID (or one corrected within this batch: the later bytes win, as they would
        # one at a time).
        new_rows[header.sop_instance_uid] = {
            "series_id": series.id, "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid, "stored_path": str(stored),
            "size_bytes": item.size, "sha256": item.sha256, "rows": header.rows,
            "columns": header.columns, "study_revision": study.revision, "received_at": now,
            "source": item.source[:32],
        }
    if new_rows:
        session.execute(insert(Instance), list(new_rows.values()))
    return outcomes


def _in_storage(settings: Settings, stored: Path) -> Path:
    """The path rows keep: relative to the storage root, which each node mounts where it likes."""
    return Path(to_storage(settings, stored))


def _stored_path(settings: Settings, header: Header) -> Path:
    return instance_path(settings.storage_dir, header.study_instance_uid,
                         header.series_instance_uid, header.sop_instance_uid)


def register_file(settings: Settings, path: Path, *, source: str = "folder", move: bool = False,
                  root: Path | None = None) -> RegisterResult:
    """Register one file. Never raises for bad input: such files are quarantined."""
    url = settings.sqlalchemy_url
    try:
        _check_path(path, root)
        header = read_header(path, max_inflated_bytes=int(settings.max_inflated_mb * 2**20))
    except IngestError as exc:
        with session_scope(url) as session:
            quarantine_file(settings, session, path, code=exc.code, reason=str(exc), move=move,
                            sender=source)
        return RegisterResult(Outcome.quarantined, reason=str(exc))
    stored = _stored_path(settings, header)
    sha, size = file_sha256(path)
    kept = _kept_as_stored(stored, path, sha)
    if kept is not None:  # the same instance in other bytes: the stored file stays
        sha, size = kept
        header = read_header(stored)
    elif not (stored.exists() and file_sha256(stored)[0] == sha):
        store_bytes_atomically(path, stored)
    with session_scope(url) as session:
        outcome, = _record_batch(session, [(Received(path, header, sha, size, source),
                                             _in_storage(settings, stored))])
    if move:
        os.unlink(path)
    log.info("%s %s (study %s)", outcome.value, header.sop_instance_uid,
             header.study_instance_uid)
    return RegisterResult(outcome, header.sop_instance_uid, header.study_instance_uid)


def _kept_as_stored(stored: Path, incoming: Path, sha: str) -> tuple[str, int] | None:
    """The stored file's (sha256, size) when ``incoming`` has other bytes but is the same
    instance (same data set: other file meta, VR encoding or transfer syntax); None otherwise.
    Then the stored bytes and their row stay as they are: no corrected instance, no reopened
    study, no second inference."""
    if not stored.is_file():
        return None
    stored_sha, stored_size = file_sha256(stored)
    if stored_sha == sha or not same_instance(stored, incoming):
        return None
    return stored_sha, stored_size


def vanished(settings: Settings, items: list[Received]) -> list[Received]:
    """The items whose bytes are gone: the spool file was removed (by hand, by a clean-up job)
    before registration put it into storage, and storage does not hold those bytes either.

    They can never be registered, so retrying them would only hold back every instance behind
    them; the caller reports them by UID (the sender has to send them again) and goes on."""
    gone = []
    for item in items:
        if item.path.exists():
            continue
        stored = _stored_path(settings, item.header)
        if not (stored.is_file() and file_sha256(stored)[0] == item.sha256):
            gone.append(item)
    return gone


def register_received(settings: Settings, items: list[Received]) -> list[RegisterResult]:
    """Register a batch of durable, already checked files (the SCP's spool) in one transaction:
    the batched form of :func:`register_file` (same rows, same rules), for received files.

    Each file is hard-linked into storage (no copy; its bytes were flushed when received), the
    changed directories are flushed once, the rows are committed, and only then are the
    spool names removed. A crash at any point leaves the spool file in place, and registering
    it again is idempotent (a duplicate)."""
    placed = []
    for item in items:
        stored = _stored_path(settings, item.header)
        kept = _kept_as_stored(stored, item.path, item.sha256)
        if kept is not None:  # same instance in other bytes: recorded as the stored file
            item = Received(item.path, read_header(stored), kept[0], kept[1], item.source)
        placed.append((item, stored))
    changed: set[Path] = set()
    for item, stored in placed:
        changed.update(link_into_storage(item.path, stored, item.sha256))
    for folder in sorted(changed, key=lambda p: len(p.parts), reverse=True):
        fsync_directory(folder)
    with session_scope(settings.sqlalchemy_url) as session:
        outcomes = _record_batch(session, [(item, _in_storage(settings, stored))
                                           for item, stored in placed])
    for item in items:
        item.path.unlink(missing_ok=True)
    results = []
    for (item, _), outcome in zip(placed, outcomes, strict=True):
        log.info("%s %s (study %s)", outcome.value, item.header.sop_instance_uid,
                 item.header.study_instance_uid)
        results.append(RegisterResult(outcome, item.header.sop_instance_uid,
                                      item.header.study_instance_uid))
    return results


def _free_mb(path: Path) -> float:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free / 2**20


def register_bytes(settings: Settings, data: bytes, *, source: str,
                   min_free_mb: float = 0.0) -> RegisterResult:
    """Register one received Part 10 byte stream (SCP, STOW-RS, C-GET) through
    :func:`register_file`, so network input gets exactly the checks, storage and rows of folder
    ingest. The bytes are staged in ``incoming/`` and moved on (stored as received, no
    re-encoding). Raises :class:`StorageFullError` when they cannot be kept; in that case no
    file and no row is left behind."""
    if _free_mb(settings.storage_dir) - len(data) / 2**20 < min_free_mb:
        raise StorageFullError(f"storage below its free-space floor of {min_free_mb:g} MB")
    incoming = settings.data_path / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=incoming, prefix="rx-", suffix=".dcm")
    staged = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return register_file(settings, staged, source=source[:32], move=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError("storage full (no space left on device)") from exc
        raise
    finally:
        staged.unlink(missing_ok=True)


def register_staged(settings: Settings, path: Path, *, source: str,
                    min_free_mb: float = 0.0) -> RegisterResult:
    """:func:`register_bytes` for bytes a receiver has already streamed into a file of its own
    under ``incoming/`` (STOW-RS parts: never whole in memory). The file is moved on or
    removed; :class:`StorageFullError` as for :func:`register_bytes`."""
    try:
        if _free_mb(settings.storage_dir) - path.stat().st_size / 2**20 < min_free_mb:
            raise StorageFullError(f"storage below its free-space floor of {min_free_mb:g} MB")
        return register_file(settings, path, source=source[:32], move=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError("storage full (no space left on device)") from exc
        raise
    finally:
        path.unlink(missing_ok=True)
