"""Quarantine: a file that cannot be registered is moved (or copied) aside with its reason in
the database, never deleted and never allowed to stop the rest of the ingest."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.orm import Session

from db.models import Event, QuarantinedFile
from lightbox import metrics
from lightbox.limits import check_deflated
from lightbox.settings import Settings

log = logging.getLogger(__name__)
KEY_FILE = "digest.key"


def _digest_key(settings: Settings) -> bytes:
    """This install's secret key for name digests (created once, 0600, in the data dir)."""
    path = settings.data_path / KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes()
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
        handle.flush()
        os.fsync(handle.fileno())
    return path.read_bytes()


def digest(settings: Settings, value: str) -> str:
    """A keyed one-way digest (HMAC-SHA256, hex, 32 chars) of a file name or sender: the same
    value matches itself, but a dictionary of patient names cannot be tried against it without
    the key."""
    return hmac.new(_digest_key(settings), value.encode("utf-8", "surrogateescape"),
                    hashlib.sha256).hexdigest()[:32]


def _study_uid_of(path: Path, max_inflated_bytes: int) -> str | None:
    """The Study Instance UID of a quarantined file when its header still names one, so the
    study's timeline can say that one of its files was quarantined and why. A deflated file is
    inflated (streamed) only within the configured limit: the file may be a deflate bomb."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        import pydicom

        check_deflated(path, max_inflated_bytes)
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["StudyInstanceUID"])
        uid = str(ds.get("StudyInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - the file is bad by definition; no UID is fine
        return None
    return uid if 0 < len(uid) <= 64 and all(c.isdigit() or c == "." for c in uid) else None


def quarantine_file(
    settings: Settings, session: Session, path: Path, *, code: str, reason: str, move: bool,
    sha256: str | None = None, sender: str | None = None,
) -> QuarantinedFile:
    """Put ``path`` in quarantine and record why. ``path`` may be a symlink: the link itself is
    moved, never what it points to. The original name (and ``sender``) are kept only as keyed
    digests: the quarantine file is named by a random id.

    A FIFO, socket or device is renamed into quarantine when ``move`` (never opened: reading a
    FIFO would block), so a watched folder does not find it again at every rescan; where it
    cannot be renamed, or without ``move``, it stays where it is."""
    day = datetime.now(timezone.utc).strftime("%Y%m%d")
    target = settings.quarantine_dir / day / uuid.uuid4().hex[:16]
    target.parent.mkdir(parents=True, exist_ok=True)
    size = path.lstat().st_size if path.is_symlink() else path.stat().st_size
    if path.is_symlink():
        # The link is recreated with its target made absolute: a relative target would
        # otherwise resolve against the quarantine folder (shutil.move keeps it verbatim).
        target.symlink_to(path.absolute().parent / path.readlink())
        if move:
            path.unlink()
    elif not path.is_file():
        # A FIFO, socket or device: nothing to read (reading a FIFO would block, copying a
        # device is meaningless). A rename never opens it.
        if not (move and _rename(path, target)):
            target = path.absolute().parent / "(left in place)"
    else:
        if move:
            shutil.move(str(path), str(target))
        else:
            shutil.copy2(path, target)
        # A moved or copied file keeps its source's mode (often 0644): it may hold patient data.
        os.chmod(target, 0o600)
    row = QuarantinedFile(
        name_digest=digest(settings, path.name),
        sender_digest=digest(settings, sender) if sender else None,
        quarantine_path=str(target), size_bytes=size, sha256=sha256, reason_code=code,
        reason=reason,
    )
    session.add(row)
    session.add(Event(kind="file_quarantined", study_instance_uid=_study_uid_of(
                          target, int(settings.max_inflated_mb * 2**20)),
                      detail={"code": code, "reason": reason, "path": str(target)}))
    # File names can carry patient names (exports named "DOE_JOHN.dcm"): log the quarantine id.
    log.warning("quarantined file %s: %s (%s)", target.name, reason, code)
    metrics.QUARANTINED.labels(code).inc()
    return row


def _rename(path: Path, target: Path) -> bool:
    try:
        os.rename(path, target)
        return True
    except OSError:  # another filesystem: leave it (the watcher remembers it)
        return False
