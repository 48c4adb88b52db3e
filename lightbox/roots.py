"""Paths kept in the database are relative to roots that each node sets for itself.

Storage (instances, spool, heatmaps, outputs) lives under ``LIGHTBOX_STORAGE_DIR`` and model
bundles under ``LIGHTBOX_MODELS_DIR``. In a cluster both are one shared (ReadWriteMany) volume
that each node may mount at a different path, so a row written on one node must name a file
that any other node can find: the path relative to the root, resolved against the reader's own
root. Rows written before the roots existed (absolute paths) still resolve as they are.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from lightbox.settings import Settings


def relative_to_root(root: Path, path: Path | str) -> str:
    """``path`` as stored in the database: relative (POSIX) under ``root``, else absolute."""
    absolute = Path(path).expanduser().resolve()
    try:
        return PurePosixPath(absolute.relative_to(root)).as_posix()
    except ValueError:  # outside the root (a bundle registered from elsewhere): kept whole
        return str(absolute)


def resolve_under(root: Path, stored: str) -> Path:
    """The file a stored path names on this node."""
    path = Path(stored)
    return path if path.is_absolute() else root / path


def stored_file(settings: Settings, stored: str) -> Path:
    """An instance's ``stored_path`` on this node."""
    return resolve_under(settings.storage_dir, stored)


def to_storage(settings: Settings, path: Path) -> str:
    return relative_to_root(settings.storage_dir, path)


def bundle_dir(settings: Settings, stored: str) -> Path:
    """A model's ``bundle_path`` on this node."""
    return resolve_under(settings.models_dir, stored)


def to_models(settings: Settings, path: Path) -> str:
    return relative_to_root(settings.models_dir, path)
