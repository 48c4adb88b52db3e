"""Quarantine: a file that cannot be registered is moved (or copied) aside with its reason in
the database, never deleted and never allowed to stop the rest of the ingest."""

from __future__ import annotations

import logging
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.orm import Session

from db.models import Event, QuarantinedFile
from lightbox import metrics
from lightbox.settings import Settings

log = logging.getLogger(__name__)
MAX_NAME = 80


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[-MAX_NAME:]
    return cleaned.lstrip(".") or "file"


def _study_uid_of(path: Path) -> str | None:
    """The Study Instance UID of a quarantined file when its header still names one, so the
    study's timeline can say that one of its files was quarantined and why."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["StudyInstanceUID"])
        uid = str(ds.get("StudyInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - the file is bad by definition; no UID is fine
        return None
    return uid if 0 < len(uid) <= 64 and all(c.isdigit() or c == "." for c in uid) else None


def quarantine_file(
    settings: Settings, session: Session, path: Path, *, code: str, reason: str, move: bool,
    sha256: str | None = None,
) -> QuarantinedFile:
    """Put ``path`` in quarantine and record why. ``path`` may be a symlink: the link itself is
    moved, never what it points to."""
    day = datetime.now(timezone.utc).strftime("%Y%m%d")
    target = settings.quarantine_dir / day / f"{uuid.uuid4().hex[:12]}-{_safe_name(path.name)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    size = path.lstat().st_size if path.is_symlink() else path.stat().st_size
    if path.is_symlink():
        # The link is recreated with its target made absolute: a relative target would
        # otherwise resolve against the quarantine folder (shutil.move keeps it verbatim).
        target.symlink_to(path.absolute().parent / path.readlink())
        if move:
            path.unlink()
    elif not path.is_file():
        # A FIFO, socket or device: nothing to keep; record it and leave it where it is
        # (reading a FIFO would block, copying a device is meaningless).
        target = path.absolute()
    elif move:
        shutil.move(str(path), str(target))
    else:
        shutil.copy2(path, target)
    row = QuarantinedFile(
        original_name=path.name[-255:], quarantine_path=str(target), size_bytes=size,
        sha256=sha256, reason_code=code, reason=reason,
    )
    session.add(row)
    session.add(Event(kind="file_quarantined", study_instance_uid=_study_uid_of(target),
                      detail={"code": code, "reason": reason, "path": str(target)}))
    # File names can carry patient names (exports named "DOE_JOHN.dcm"): log the quarantine id.
    log.warning("quarantined file %s: %s (%s)", target.name.split("-", 1)[0], reason, code)
    metrics.QUARANTINED.labels(code).inc()
    return row
