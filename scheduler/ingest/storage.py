"""Managed storage: received files are kept byte for byte as received (no re-encoding), under
``storage/<study>/<series>/<sop>.dcm``. Writes go to a temporary file that is fsynced and then
renamed, so a crash never leaves a half-written instance under its final name. Network input
is first made durable in a spool on the same filesystem (:mod:`scheduler.ingest.spool`) and then
hard-linked here: written and flushed once, never copied."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

CHUNK = 1 << 20


def instance_path(root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    # UIDs are validated as [0-9.] by scheduler.ingest.header before they reach a path.
    return root / study_uid / series_uid / f"{sop_uid}.dcm"


def file_sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def store_bytes_atomically(data_source: Path, target: Path) -> None:
    """Copy ``data_source`` to ``target`` via fsynced temp file + rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, data_source.open("rb") as src:
            while block := src.read(CHUNK):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_directory(path: Path) -> None:
    """Make the names in ``path`` (created, linked, renamed) survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directories(path: Path) -> list[Path]:
    """``mkdir -p`` that returns the parents whose entries changed (they need an fsync)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
    return [folder.parent for folder in missing]


def link_into_storage(source: Path, target: Path, sha256: str) -> list[Path]:
    """Put the (already durable) ``source`` file under ``target`` without copying it: a hard
    link on the same filesystem; a fsynced copy where links are not supported. An identical
    file already there is kept; a different one (a corrected instance) is replaced atomically.

    Returns the directories whose entries changed: the caller fsyncs them (once per batch)
    before it commits rows that point at ``target``."""
    changed = make_directories(target.parent)
    if target.exists():
        if file_sha256(target)[0] == sha256:
            return changed
        tmp = target.parent / f".incoming-{os.urandom(6).hex()}.tmp"
        try:
            os.link(source, tmp)
            os.replace(tmp, target)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            store_bytes_atomically(source, target)
        return [*changed, target.parent]
    try:
        os.link(source, target)
    except FileExistsError:  # another association stored the same instance meanwhile
        return link_into_storage(source, target, sha256)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        store_bytes_atomically(source, target)
    return [*changed, target.parent]
