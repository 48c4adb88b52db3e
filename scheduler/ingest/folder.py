"""`lightbox ingest PATH...` (one-shot) and `lightbox watch DIR` (continuous).

The watcher combines watchdog events (low latency) with a periodic full rescan, so files
dropped while it was down, or whose events were missed, are still found. A file is read only
after it has been unchanged for ``watch_settle_seconds``, so half-copied files are not taken.
Files whose names start with '.' or end in '.part'/'.tmp' are in-progress writes and skipped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from lightbox.settings import Settings
from scheduler.ingest.registration import Outcome, RegisterResult, register_file

log = logging.getLogger(__name__)
IN_PROGRESS_SUFFIXES = (".part", ".tmp", ".partial")


def _skip(path: Path) -> bool:
    return path.name.startswith(".") or path.name.endswith(IN_PROGRESS_SUFFIXES)


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files under ``paths`` (symlinks are yielded, not followed, so they can be judged)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    candidate = Path(dirpath) / name
                    if not _skip(candidate):
                        yield candidate
        elif path.exists() or path.is_symlink():
            yield path


def ingest_paths(settings: Settings, paths: Iterable[Path], *, move: bool = False,
                 on_result: Callable[[Path, RegisterResult], None] | None = None) -> Counter[str]:
    counts: Counter[str] = Counter()
    for path in paths:
        root = path if path.is_dir() else path.parent
        for file in iter_files([path]):
            result = register_file(settings, file, source="folder", move=move, root=root)
            counts[result.outcome.value] += 1
            if on_result:
                on_result(file, result)
    return counts


class _Pending(FileSystemEventHandler):
    def __init__(self) -> None:
        self.paths: set[Path] = set()
        self.lock = threading.Lock()

    def add(self, path: Path) -> None:
        with self.lock:
            self.paths.add(path)

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.add(Path(str(event.src_path)))

    on_modified = on_created

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.add(Path(str(event.dest_path)))

    def take_settled(self, settle: float) -> list[Path]:
        now, ready = time.time(), []
        with self.lock:
            for path in list(self.paths):
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    self.paths.discard(path)
                    continue
                if now - st.st_mtime >= settle and not _skip(path):
                    ready.append(path)
                    self.paths.discard(path)
        return sorted(ready)


def watch(settings: Settings, directory: Path, stop: threading.Event,
          on_result: Callable[[Path, RegisterResult], None] | None = None) -> Counter[str]:
    """Ingest everything that appears in ``directory`` (moving it out) until ``stop`` is set."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    pending = _Pending()
    observer = Observer()
    observer.schedule(pending, str(directory), recursive=True)
    observer.start()
    counts: Counter[str] = Counter()
    # Non-regular files (FIFOs, sockets, devices) quarantined but left in place (they could not
    # be renamed away): quarantined once, not at every rescan. Keyed by inode, never by name.
    left_in_place: set[tuple[int, int]] = set()
    next_rescan = 0.0
    log.info("watching %s", directory)
    try:
        while not stop.is_set():
            if time.monotonic() >= next_rescan:
                _remove_empty_dirs(directory)
                for file in iter_files([directory]):
                    pending.add(file)
                next_rescan = time.monotonic() + settings.watch_rescan_seconds
            for file in pending.take_settled(settings.watch_settle_seconds):
                if _inode(file) in left_in_place:
                    continue
                try:
                    result = register_file(settings, file, source="folder", move=True,
                                           root=directory)
                except OSError as exc:  # disk full, permissions: keep the file, try again later
                    # strerror only: the path may carry a patient's name.
                    log.error("cannot ingest a file now, will retry: %s", exc.strerror or exc)
                    continue
                except SQLAlchemyError as exc:  # database restarting: the file stays, rescan retries
                    log.error("database unavailable, will retry: %s", type(exc).__name__)
                    continue
                counts[result.outcome.value] += 1
                key = _inode(file)
                if key is not None and not file.is_symlink() and not file.is_file():
                    left_in_place.add(key)
                if on_result:
                    on_result(file, result)
            stop.wait(0.2)
    finally:
        observer.stop()
        observer.join(timeout=5)
    return counts


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _remove_empty_dirs(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        if Path(dirpath) != root and not dirnames and not filenames:
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


__all__ = ["Outcome", "ingest_paths", "iter_files", "watch"]
