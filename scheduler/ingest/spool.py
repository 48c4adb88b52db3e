"""The storage SCP's durable receive spool, and the registrar that drains it.

A C-STORE success tells the sender it may forget the instance, so the bytes must be on disk
before the reply; the database rows need not be. The SCP therefore writes each received
instance once into a *slot* of the spool (``<storage>/.spool``, same filesystem as storage),
flushes it, answers, and hands it to :class:`SpoolRegistrar`, a process of its own that
registers whatever has queued up in one transaction (:func:`scheduler.ingest.registration.register_received`):
files are hard-linked into storage, never copied, and rows for a whole batch cost one commit.

Why slots: a new file's name is only durable after an fsync of its directory, a second disk
flush per instance. Slots are empty files created (and their directory flushed) ahead of time
in batches, so receiving costs one ``fdatasync`` of the slot. An empty slot is free; a slot
with bytes is an instance waiting for registration. When the SCP starts, slots with bytes
left by a crash are registered (:func:`recover`); one cut short by the crash was never
acknowledged and fails the header checks, so it is quarantined with its reason.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import multiprocessing
import multiprocessing.process
import os
import queue
import shutil
import signal
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from sqlalchemy.exc import OperationalError

from db.models import Event
from db.session import session_scope
from lightbox.errors import IngestError, StorageFullError
from lightbox.settings import Settings
from scheduler.ingest.header import MAX_INFLATED_DEFAULT, PARSE_ERRORS, read_header
from scheduler.ingest.registration import (
    Received,
    register_file,
    register_received,
    vanished,
)
from scheduler.ingest.storage import file_sha256, fsync_directory

log = logging.getLogger(__name__)

SPOOL_DIR = ".spool"
SLOT_PREFIX = "slot-"
POOL_SIZE = 64
BATCH_MAX = 256
# The registrar gathers for this long before a batch: fewer commits and directory flushes
# (which would compete with the receiving side's flushes for the disk).
BATCH_WINDOW_SECONDS = 0.25
RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0)
RESPAWN_SECONDS = 5.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def spool_dir(settings: Settings) -> Path:
    return settings.storage_dir / SPOOL_DIR


class Spool:
    """Pre-created empty slot files; :meth:`write` fills one and flushes it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._free: deque[Path] = deque(p for p in self._slots() if p.stat().st_size == 0)
        # fdatasync releases the GIL: flushing one instance overlaps with checking its header.
        self._flusher = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spool-flush")
        self.refill()

    def _slots(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir()
                      if p.name.startswith(SLOT_PREFIX) and p.is_file())

    def leftovers(self) -> list[Path]:
        """Slots holding bytes: instances received before a crash, not yet registered."""
        return [p for p in self._slots() if p.stat().st_size > 0]

    def refill(self, size: int = POOL_SIZE) -> None:
        """Create free slots up to ``size``, with one directory flush for all of them."""
        if len(self._free) >= size:
            return
        created = [self._create() for _ in range(size - len(self._free))]
        fsync_directory(self.directory)
        self._free.extend(created)

    def _create(self) -> Path:
        path = self.directory / f"{SLOT_PREFIX}{uuid.uuid4().hex}"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        return path

    def _take(self) -> Path:
        try:
            return self._free.popleft()
        except IndexError:  # the registrar has not refilled yet: pay the directory flush
            path = self._create()
            fsync_directory(self.directory)
            return path

    def write(self, data: bytes, *, min_free_mb: float = 0.0) -> Flushing:
        """Put ``data`` in a slot and start flushing it (in a helper thread, so the caller
        can check the header meanwhile); :meth:`Flushing.wait` returns the slot once durable.
        Raises :class:`StorageFullError` (and keeps nothing) when the bytes cannot be kept."""
        free_mb = shutil.disk_usage(self.directory).free / 2**20
        if free_mb - len(data) / 2**20 < min_free_mb:
            raise StorageFullError(f"storage below its free-space floor of {min_free_mb:g} MB")
        slot = self._take()
        fd = os.open(slot, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException as exc:
            self._release(fd, slot)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError("storage full (no space left on device)") from exc
            raise
        return Flushing(self, slot, fd, self._flusher.submit(os.fdatasync, fd))

    def _release(self, fd: int, slot: Path) -> None:
        """Empty a slot whose bytes were refused and give it back to the pool."""
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        self._free.append(slot)


class Flushing:
    """A slot whose bytes are written and being flushed to disk."""

    def __init__(self, spool: Spool, slot: Path, fd: int, flushed: Future[None]) -> None:
        self.spool, self.slot, self._fd, self._flushed = spool, slot, fd, flushed

    def wait(self) -> Path:
        """Return the slot once its bytes are durable (delayed allocation can still fail
        here with ENOSPC: then the slot is emptied and :class:`StorageFullError` raised)."""
        try:
            self._flushed.result()
        except OSError as exc:
            self.spool._release(self._fd, self.slot)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError("storage full (no space left on device)") from exc
            raise
        os.close(self._fd)
        return self.slot


def received(slot: Path, data: bytes | None = None, source: str | None = None, *,
             max_inflated_bytes: int = MAX_INFLATED_DEFAULT) -> Received:
    """Check a filled slot's header (raises :class:`IngestError`) and describe it. Without
    ``source`` (recovery), it is read back from the file meta (Sending AE Title)."""
    header = read_header(data if data is not None else slot,
                         max_inflated_bytes=max_inflated_bytes)
    if data is not None:
        sha, size = hashlib.sha256(data).hexdigest(), len(data)
    else:
        sha, size = file_sha256(slot)
    if source is None:
        try:
            sending = str(read_file_meta_info(slot).get("SendingApplicationEntityTitle", ""))
        except (InvalidDicomError, *PARSE_ERRORS):
            sending = ""
        source = f"scp:{sending.strip()}" if sending.strip() else "scp"
    return Received(slot, header, sha, size, source[:32])


def recover(settings: Settings, spool: Spool) -> dict[str, int]:
    """Register the slots a crash left filled (before the SCP accepts anything)."""
    counts: dict[str, int] = {}
    items = []
    for slot in spool.leftovers():
        try:
            items.append(received(
                slot, max_inflated_bytes=int(settings.max_inflated_mb * 2**20)))
        except IngestError:
            # Cut short by the crash, hence never acknowledged: quarantined with its reason.
            result = register_file(settings, slot, source="scp", move=True)
            counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
    for start in range(0, len(items), BATCH_MAX):
        for result in register_received(settings, items[start:start + BATCH_MAX]):
            counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
    if counts:
        log.warning("spool recovery after an unclean stop: %s", counts)
    spool.refill()
    return counts


class SpoolRegistrar:
    """Registers spooled instances in batches (one transaction each) while the SCP receives,
    in a process of its own.

    Why a process: a sender waits for each C-STORE reply, so the SCP's throughput is the
    latency of its network threads, and those are Python threads. Registration is Python
    work too (SQLAlchemy, one commit per batch); in the same interpreter it would hold the
    GIL the network threads wait for. In a spawned process it runs on another core, and the
    SCP's side of a hand-over is one queue put (the already-checked :class:`Received`).

    Transient failures (database down, storage full) keep the batch and retry with backoff:
    the files stay in the spool, so nothing acknowledged is ever dropped. A slot whose file was
    removed before registration (by hand, by a clean-up job) is not transient: it is logged by
    UID, recorded as a ``spool_instance_vanished`` event, and the rest of its batch goes on. A
    batch that fails otherwise is retried one instance at a time; an instance that still fails
    is left in the spool (logged by UID) and registered at the next start. Should the process
    die, the slots it held are registered at the next start too, and a new process takes over."""

    def __init__(self, settings: Settings, spool: Spool, counts: dict[str, int],
                 lock: threading.Lock) -> None:
        self.settings, self.spool, self.counts, self.lock = settings, spool, counts, lock
        self._context = multiprocessing.get_context("spawn")  # no forked SCP threads
        self._results: multiprocessing.Queue[dict[str, int]] = self._context.Queue()
        self._items: multiprocessing.Queue[Received | None] = self._context.Queue()
        self._process = self._spawn()
        self._collector = threading.Thread(target=self._collect, name="spool-registrar",
                                           daemon=True)
        self._stopping = threading.Event()

    def _spawn(self) -> multiprocessing.process.BaseProcess:
        return self._context.Process(target=run_registrar, name="spool-registrar", daemon=True,
                                     args=(self.settings, self._items, self._results,
                                           os.getpid()))

    def start(self) -> None:
        self._process.start()
        self._collector.start()

    def submit(self, item: Received) -> None:
        self._items.put(item)

    def stop(self, timeout: float | None = None) -> None:
        """Register what is queued, then end."""
        self._stopping.set()
        self._items.put(None)
        self._process.join(timeout)
        self._collector.join(timeout)

    def _collect(self) -> None:
        """Count the outcomes the process reports and refill the spool's free slots."""
        while True:
            try:
                outcomes = self._results.get(timeout=0.5)
            except queue.Empty:
                if self._process.is_alive():
                    continue
                if self._stopping.is_set():
                    return
                log.error("spool registrar process ended (exit code %s); starting a new one "
                          "in %.0f s (its slots are registered at the next start)",
                          self._process.exitcode, RESPAWN_SECONDS)
                if self._stopping.wait(RESPAWN_SECONDS):
                    return
                self._process = self._spawn()
                self._process.start()
                continue
            with self.lock:
                for key, count in outcomes.items():
                    self.counts[key] = self.counts.get(key, 0) + count
            self.spool.refill()


def _die_with_parent(parent: int) -> None:
    """A registrar outliving a killed SCP would race the next SCP's recovery for the same
    slots: on Linux the kernel kills it with its parent (PR_SET_PDEATHSIG); elsewhere the
    batch loop checks its parent."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # gone before prctl took effect
        os._exit(0)


def run_registrar(settings: Settings, items: multiprocessing.Queue[Received | None],
                  results: multiprocessing.Queue[dict[str, int]], parent: int) -> None:
    """The registrar process: batches of what the SCP queued, until ``None`` arrives."""
    from lightbox.logs import setup_logging

    _die_with_parent(parent)
    # Ctrl-C reaches the whole process group; the SCP's shutdown then drains this queue
    # (stop()), so the registrar must not end halfway on its own. SIGTERM keeps its default:
    # multiprocessing ends a daemon process with it (deploy/systemd sends the stop signal to
    # the SCP alone: KillMode=mixed).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(settings)
    pending: list[Received] = []
    stopping = False
    failures = 0
    while pending or not stopping:
        if os.getppid() != parent:
            os._exit(0)  # the SCP was killed: its next start registers the spool
        if not pending:
            try:
                first = items.get(timeout=0.2)
            except queue.Empty:
                continue
            if first is None:
                stopping = True
                continue
            pending.append(first)
            time.sleep(BATCH_WINDOW_SECONDS)
        while len(pending) < BATCH_MAX:
            try:
                item = items.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stopping = True
                break
            pending.append(item)
        try:
            results.put(_register(settings, pending))
        except (OperationalError, OSError) as exc:
            gone = vanished(settings, pending)
            if gone:  # not transient: retrying would hold back everything behind them
                results.put({"vanished": _report_vanished(settings, gone)})
                pending = [item for item in pending if item not in gone]
                continue
            delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
            failures += 1
            log.error("registering %d spooled instances failed (%s); retry in %.1f s",
                      len(pending), type(exc).__name__, delay)
            if stopping and failures > len(RETRY_SECONDS):
                return  # stopping: the spool keeps them for the next start
            time.sleep(delay)
            continue
        except Exception:  # noqa: BLE001 - isolate the instance at fault, keep the rest
            log.exception("batch of %d failed; registering one at a time", len(pending))
            for single in pending:
                try:
                    results.put(_register(settings, [single]))
                except Exception:  # noqa: BLE001 - left in the spool for the next start
                    log.exception("spooled %s not registered (kept in the spool)",
                                  single.header.sop_instance_uid)
        pending, failures = [], 0


def _report_vanished(settings: Settings, gone: list[Received]) -> int:
    """Log (UIDs only) and record acknowledged instances whose spool file was removed before
    they were registered: an operator must have the sender send them again."""
    for item in gone:
        log.error("spooled instance %s (study %s) was removed from the spool before it was "
                  "registered: not registered, the sender must send it again",
                  item.header.sop_instance_uid, item.header.study_instance_uid)
    try:
        with session_scope(settings.sqlalchemy_url) as session:
            session.add(Event(kind="spool_instance_vanished", detail={
                "instances": [{"sop_instance_uid": item.header.sop_instance_uid,
                               "study_instance_uid": item.header.study_instance_uid}
                              for item in gone]}))
    except OperationalError:  # the database is down: the log lines above still say it
        log.warning("could not record %d vanished spool instance(s) in the database", len(gone))
    return len(gone)


def _register(settings: Settings, items: list[Received]) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    for result in register_received(settings, items):
        outcomes[result.outcome.value] = outcomes.get(result.outcome.value, 0) + 1
    return outcomes
