"""Dynamic batching across studies: images from every job in flight share runtime calls.

Like Triton's dynamic batcher: a batch is run as soon as it holds ``max_batch`` images (the
preferred batch size) or its first image has waited ``max_wait`` seconds (the queue delay),
whichever comes first. Runner threads own the runtime calls: as many as the runtime takes at
once (its ``parallel_runs``, Triton's model instances: one per core for ONNX Runtime on CPU,
see :mod:`worker.runtime_onnx`), each collecting and running its own batch from the one queue.
A runtime that takes one call at a time (TensorRT: one execution context and stream) gets one
runner, so its CUDA context lives in exactly one thread and it is never called concurrently.

Results go back by position: each submitted image gets its own future, resolved with that
image's slice of every output and the identity of the batch it ran in (id, size, the jobs that
shared it), so a job can record which batches its findings came from.

Error isolation: if a batch call fails, each of its images is run again alone, so a model error
caused by one study's image fails only that study's job.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from lightbox import metrics
from worker.runtime import ModelRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchInfo:
    batch_id: int
    size: int
    job_ids: tuple[int, ...]


@dataclass(frozen=True)
class ImageResult:
    """One image's outputs (each output's row for this image) and the batch it ran in."""

    outputs: dict[str, np.ndarray]
    batch: BatchInfo


@dataclass
class _Pending:
    tensor: np.ndarray
    job_id: int
    future: Future[ImageResult] = field(default_factory=Future)


_STOP = object()
_batch_ids = itertools.count(1)


class Batcher:
    """``submit(tensor, job_id) -> Future[ImageResult]``; ``runners`` threads per model, each
    making one runtime call at a time."""

    def __init__(self, runtime: ModelRuntime, *, max_batch: int, max_wait_s: float,
                 name: str = "batcher", runners: int = 1) -> None:
        self.runtime = runtime
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self._queue: queue.Queue[_Pending | object] = queue.Queue()
        self._counts = threading.Lock()
        self._filling = threading.Lock()
        self.batches_run = 0
        self.images_run = 0
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, runners))]
        for thread in self._threads:
            thread.start()

    @property
    def runners(self) -> int:
        return len(self._threads)

    def submit(self, tensor: np.ndarray, job_id: int) -> Future[ImageResult]:
        pending = _Pending(tensor, job_id)
        self._queue.put(pending)
        return pending.future

    def close(self) -> None:
        """Each runner finishes the batch it holds and takes one stop mark."""
        for _ in self._threads:
            self._queue.put(_STOP)
        for thread in self._threads:
            thread.join(timeout=30)

    def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """The first image plus whatever arrives before the batch is full or the delay ends."""
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = (self._queue.get(timeout=remaining) if remaining > 0
                        else self._queue.get_nowait())
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            assert isinstance(item, _Pending)
            batch.append(item)
        return batch, stop

    def _loop(self) -> None:
        while True:
            # One runner fills a batch at a time while the others run theirs: batches fill in
            # turn (full ones under load) instead of the queue being dealt out among runners.
            with self._filling:
                item = self._queue.get()
                if item is _STOP:
                    return
                assert isinstance(item, _Pending)
                batch, stop = self._collect(item)
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if live:
                self._run(live)
            if stop:
                return

    def _run(self, batch: list[_Pending]) -> None:
        info = BatchInfo(next(_batch_ids), len(batch),
                         tuple(sorted({p.job_id for p in batch})))
        try:
            stacked = np.stack([p.tensor for p in batch])  # small tensors: one cheap copy
            started = time.perf_counter()
            outputs = self.runtime.infer(stacked)
            metrics.STAGE_SECONDS.labels("inference").observe(time.perf_counter() - started)
            metrics.BATCH_SIZE.observe(len(batch))
            rows = {name: np.asarray(value) for name, value in outputs.items()}
            for name, value in rows.items():
                if value.shape[0] != len(batch):
                    raise ValueError(f"output {name!r} has {value.shape[0]} rows for a batch "
                                     f"of {len(batch)}")
        except Exception as exc:  # noqa: BLE001 - isolate the failing image below
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log.warning("batch %d (%d images, jobs %s) failed (%s); running its images alone",
                        info.batch_id, info.size, list(info.job_ids), type(exc).__name__)
            for pending in batch:
                self._run([pending])
            return
        with self._counts:
            self.batches_run += 1
            self.images_run += len(batch)
        log.debug("batch %d: %d image(s) from jobs %s", info.batch_id, info.size,
                  list(info.job_ids))
        for index, pending in enumerate(batch):
            pending.future.set_result(ImageResult(
                {name: value[index] for name, value in rows.items()}, info))
