"""Decode and preprocess overlapped with inference: a pool of processes sized by cores.

Why processes, and why ``spawn``: measured on this code on a 2-core VM (``prepare_file`` on
the real JPEG 2000 chest CR), one process did 2.05 images/s, two threads 1.89, two spawned
processes 3.87: pydicom's parsing, the pylibjpeg plugins and PIL hold the GIL for most of the
work, so decoding in threads gains nothing and would starve the batcher and the Celery threads
of the one interpreter (bench/decode.py measures the three side by side). Children are *spawned*,
never forked: a fork after ONNX Runtime's thread pool or a CUDA context exists inherits a broken
copy of either.

Why it is cheap: each child reads the file, decodes the pixels once, converts them in place
(:func:`lightbox.pixels.to_display`) and resizes — JPEG 2000 only down to the wavelet level
the model input needs (:mod:`lightbox.j2k_reduced`); only the small model tensor (e.g. 1×64×64
float32, 16 KiB) crosses back to the worker, never the 7 MB frame.

What each image costs the worker process (the one submitting thread every image goes
through, whose CPU bounds the pool on many cores): the manifest used to be pickled whole on
every submit (~60 µs) and unpickled in the child; now each manifest is pickled once per
worker (:meth:`DecodePool._spec`) and each child keeps the few specs it has seen, so a submit
sends the path and a ~1 KB bytes object. The tensor came back pickled through the result
pipe and unpickled by the executor's one management thread (~250-300 µs of the worker
process's CPU per image here, about half of what the pool cost it); now the child writes it
into a slot of one shared-memory block the pool owns (:class:`_Slots`, a slot per image in
flight up to ``workers × 4`` and ``MAX_SLOTS``, each ``SLOT_BYTES``: 16 MiB of ``/dev/shm`` at
most; without a usable ``/dev/shm`` the pool warns once and uses the pipe) and only its shape crosses the pipe; the
worker copies it out and frees the slot. With no free slot, or a tensor larger than a slot
(volumes), the tensor comes back pickled as before. ``bench/decode.py --pool-only`` reports
the worker process's CPU per image and the pool's images/s both ways (``fast=False``: the old
path).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any, cast

import numpy as np

from lightbox.manifest import Manifest
from lightbox.preprocess import prepare_file

log = logging.getLogger(__name__)


def _quiet_child() -> None:
    """Children decode with one thread each: parallelism comes from the pool itself."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _prepare(path: str, manifest: Manifest) -> np.ndarray:
    return prepare_file(path, manifest)


_CHILD_SPECS: dict[bytes, Manifest] = {}


def _prepare_spec(path: str, spec: bytes) -> np.ndarray:
    """In the child: the manifest from the few this child has seen, unpickled once each."""
    manifest = _CHILD_SPECS.get(spec)
    if manifest is None:
        if len(_CHILD_SPECS) >= 64:  # a worker serves a handful of models; stay bounded
            _CHILD_SPECS.clear()
        manifest = _CHILD_SPECS[spec] = pickle.loads(spec)  # noqa: S301 - our own bytes
    return prepare_file(path, manifest)


_CHILD_BLOCKS: dict[str, SharedMemory] = {}
SLOT_BYTES = 256 * 1024  # a 1×256×256 float32 tensor; 224² inputs take 196 KiB
MAX_SLOTS = 64  # a container's /dev/shm is often 64 MB: keep well under it


def _prepare_into(path: str, spec: bytes, block: str, offset: int,
                  capacity: int) -> np.ndarray | tuple[tuple[int, ...], str]:
    """In the child: prepare, then write the tensor into the worker's slot and return only
    its shape and dtype (or the tensor itself when it does not fit)."""
    tensor = _prepare_spec(path, spec)
    if tensor.nbytes > capacity:
        return tensor
    shm = _CHILD_BLOCKS.get(block)
    if shm is None:
        shm = _CHILD_BLOCKS[block] = SharedMemory(name=block)
    view = np.ndarray(tensor.shape, tensor.dtype, buffer=shm.buf, offset=offset)
    view[...] = tensor
    return tensor.shape, tensor.dtype.str


class _Slots:
    """Fixed slots in one shared-memory block, handed out per image in flight."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self.shm = SharedMemory(create=True, size=count * size)
        self._free = list(range(count))
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def give(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def read(self, slot: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        view = np.ndarray(shape, np.dtype(dtype), buffer=self.shm.buf, offset=slot * self.size)
        return view.copy()

    def close(self) -> None:
        self.shm.close()
        self.shm.unlink()


def _copy_out(slots: _Slots, slot: int, out: Future[np.ndarray], source: Future[Any]) -> None:
    """Runs in the executor's thread when the child is done: the tensor out of its slot."""
    try:
        if source.cancelled():
            out.cancel()
            return
        exc = source.exception()
        if exc is not None:
            out.set_exception(exc)
            return
        value = source.result()
        if isinstance(value, np.ndarray):
            out.set_result(value)
        else:
            shape, dtype = cast(tuple[tuple[int, ...], str], value)
            out.set_result(slots.read(slot, tuple(shape), dtype))
    except InvalidStateError:  # the caller cancelled meanwhile: nothing to deliver
        pass
    finally:
        slots.give(slot)


def _cancel_source(source: Future[Any], out: Future[np.ndarray]) -> None:
    if out.cancelled():
        source.cancel()


def pool_size(configured: int) -> int:
    return configured if configured > 0 else max(1, os.cpu_count() or 1)


class DecodePool:
    """``submit(path, manifest) -> Future[tensor]``; a crashed child fails only its images.

    A decoder that kills its process (a segfault on a hostile file) breaks a
    ``ProcessPoolExecutor`` for good; the pool is then replaced and the affected futures carry
    :class:`BrokenProcessPool`, which fails their jobs as retryable instead of the worker."""

    def __init__(self, workers: int = 0, fast: bool = True) -> None:
        self.workers = pool_size(workers)
        self.fast = fast
        self._lock = threading.Lock()
        self._specs: dict[int, tuple[Manifest, bytes]] = {}
        self._slots: _Slots | None = None
        if fast:
            try:  # at most MAX_SLOTS × SLOT_BYTES (16 MiB) of /dev/shm, whatever the cores
                self._slots = _Slots(min(MAX_SLOTS, self.workers * 4), SLOT_BYTES)
            except OSError as exc:  # no usable /dev/shm: tensors come back pickled
                log.warning("decode pool without shared memory (%s)", type(exc).__name__)
        self._executor = self._new_executor()

    def _spec(self, manifest: Manifest) -> bytes:
        """The manifest pickled once (keyed by object: a loaded model keeps its manifest;
        the manifest is held so its id is never reused while cached)."""
        cached = self._specs.get(id(manifest))
        if cached is None or cached[0] is not manifest:
            if len(self._specs) >= 256:
                self._specs.clear()
            cached = self._specs[id(manifest)] = (manifest, pickle.dumps(manifest))
        return cached[1]

    def _submit(self, path: str, manifest: Manifest) -> Future[np.ndarray]:
        if self._slots is None:
            return self._executor.submit(_prepare, path, manifest)
        slot = self._slots.take()
        if slot is None:  # every slot in flight: this one comes back pickled
            return self._executor.submit(_prepare_spec, path, self._spec(manifest))
        try:
            source = self._executor.submit(_prepare_into, path, self._spec(manifest),
                                           self._slots.shm.name, slot * self._slots.size,
                                           self._slots.size)
        except BaseException:
            self._slots.give(slot)
            raise
        out: Future[np.ndarray] = Future()
        out.add_done_callback(partial(_cancel_source, source))
        source.add_done_callback(partial(_copy_out, self._slots, slot, out))
        return out

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, initializer=_quiet_child,
                                   mp_context=multiprocessing.get_context("spawn"))

    def submit(self, path: str | Path, manifest: Manifest) -> Future[np.ndarray]:
        with self._lock:
            try:
                return self._submit(str(path), manifest)
            except BrokenProcessPool:
                log.warning("decode pool broken (a child died); starting a new one")
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = self._new_executor()
                return self._submit(str(path), manifest)

    def submit_call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Any picklable call in the pool (volume slices: :func:`lightbox.volume.decode_file_slices`),
        with the same broken-pool recovery as :meth:`submit`."""
        with self._lock:
            try:
                return self._executor.submit(fn, *args)
            except BrokenProcessPool:
                log.warning("decode pool broken (a child died); starting a new one")
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = self._new_executor()
                return self._executor.submit(fn, *args)

    def warm_up(self) -> None:
        """Start every child now (spawn costs an interpreter start), not on the first job."""
        futures = [self._executor.submit(os.getpid) for _ in range(self.workers * 2)]
        for future in futures:
            future.result()

    def close(self) -> None:
        with self._lock:
            self._executor.shutdown(wait=True, cancel_futures=True)
            if self._slots is not None:
                self._slots.close()


class InlineDecoder:
    """Decode in the calling thread: for one-off runs (tests, CLI) that need no pool."""

    workers = 1

    def submit(self, path: str | Path, manifest: Manifest) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        try:
            future.set_result(_prepare(str(path), manifest))
        except Exception as exc:  # noqa: BLE001 - carried to the job like a pool error
            future.set_exception(exc)
        return future

    def submit_call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - carried to the job like a pool error
            future.set_exception(exc)
        return future

    def warm_up(self) -> None:
        return None

    def close(self) -> None:
        return None
