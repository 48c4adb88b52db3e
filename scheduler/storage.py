"""Managed storage: received files are kept byte for byte as received (no re-encoding), under
``storage/<study>/<series>/<sop>.dcm``. Writes go to a temporary file that is fsynced and then
renamed, so a crash never leaves a half-written instance under its final name."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

CHUNK = 1 << 20


def instance_path(root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    # UIDs are validated as [0-9.] by scheduler.header before they reach a path.
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
