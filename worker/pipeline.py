"""What a worker process shares between the jobs it has in flight.

    Celery thread (one per job) ── claim ──▶ decode pool (processes) ──▶ batcher (one thread
    per model: one runtime call for images of many jobs) ──▶ back to the job's thread by
    future ──▶ result writer (one transaction for every job finished together) ──▶ ack

:class:`WorkerPipeline` is the batched path a ``lightbox worker`` runs. :class:`InlineRunner`
is the same contract without threads or processes (decode in the caller, one runtime call per
job, a direct commit) for one-off use such as tests and scripts.

Every decode goes through :class:`~worker.shared_decode.SharedDecoder`: the jobs of a study
routed to several models (one job per model) share one decode per image and preprocessing
spec, and the pipeline is sized to the node (:mod:`worker.layout`) where settings say auto.
On a node with a GPU and the gpu-decode extra, compressed frames are decoded and prepared on
the GPU in front of the pool (:mod:`worker.gpu_decode`); the pool takes the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np
from sqlalchemy import select

from db.models import Model, ModelStage
from db.session import session_scope
from lightbox import metrics
from lightbox.errors import PixelDecodeError
from lightbox.settings import Settings
from worker.batcher import Batcher, BatchInfo, ImageResult
from worker.decode_pool import InlineDecoder
from worker.gpu_decode import make_decoder
from worker.heartbeat import Heartbeats
from worker.layout import model_batch_limit, sized_settings
from worker.model_cache import LoadedModel, ModelCache
from worker.shared_decode import Decoder, SharedDecoder
from worker.writer import JobResult, ResultWriter, write_group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRef:
    sop_instance_uid: str
    series_instance_uid: str
    path: str


class JobRunner(Protocol):
    cache: ModelCache
    heartbeats: Heartbeats

    def infer_images(self, model: LoadedModel, job_id: int,
                     images: list[ImageRef]) -> list[ImageResult]: ...

    def infer_shared(self, models: list[LoadedModel], job_id: int,
                     images: list[ImageRef]) -> list[list[ImageResult] | None]: ...

    def infer_tensors(self, model: LoadedModel, job_id: int,
                      tensors: list[np.ndarray]) -> list[ImageResult]: ...

    def commit(self, result: JobResult) -> None: ...


def same_input(a: LoadedModel, b: LoadedModel) -> bool:
    """Two models that take the same tensor from a file can share one decode (shadow mode)."""
    return (a.manifest.input, a.manifest.preprocessing, a.manifest.kind, a.manifest.features) \
        == (b.manifest.input, b.manifest.preprocessing, b.manifest.kind, b.manifest.features)


def _wait_all(images: list[ImageRef], futures: list[Future[ImageResult]],
              decodes: list[Future[np.ndarray]], timeout: float) -> list[ImageResult]:
    """Each image's result in order; the first failure cancels what has not started."""
    results = []
    for image, future in zip(images, futures, strict=True):
        try:
            results.append(future.result(timeout=timeout))
        except BaseException as exc:
            for pending in decodes:
                pending.cancel()
            if isinstance(exc, PixelDecodeError):
                raise PixelDecodeError(f"instance {image.sop_instance_uid}: {exc}") from exc
            raise
    return results


def _others(images: list[ImageRef], futures: list[Future[ImageResult]],
            timeout: float) -> list[ImageResult] | None:
    """A secondary (shadow) model's results, or None when any image failed on it."""
    try:
        return _wait_all(images, futures, [], timeout)
    except Exception as exc:  # noqa: BLE001 - a shadow failure never fails the job
        log.warning("shadow inference failed: %s", type(exc).__name__)
        return None


def _forward(target: Future[ImageResult], source: Future[ImageResult]) -> None:
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


class WorkerPipeline:
    """Decode pool + per-model batchers + group-commit writer + heartbeats, for one process."""

    def __init__(self, settings: Settings, cache: ModelCache,
                 decoder: Decoder | None = None) -> None:
        settings = sized_settings(settings)
        self.settings, self.cache = settings, cache
        # The GPU (nvImageCodec + CuPy) in front of the decode pool where the node has one.
        inner = decoder if decoder is not None else make_decoder(settings)
        self.decoder = SharedDecoder(inner, settings.decode_share_mb * 1024 * 1024)
        self.writer = ResultWriter(settings)
        self.heartbeats = Heartbeats(settings)
        self._batchers: dict[int, Batcher] = {}
        self._lock = threading.Lock()

    def batcher_for(self, model: LoadedModel) -> Batcher:
        with self._lock:
            batcher = self._batchers.get(model.model_id)
            if batcher is None:
                limit = model_batch_limit(model.manifest, self.settings.batch_max_size)
                runtime_limit = getattr(model.runtime, "max_batch", None)
                if runtime_limit:
                    limit = min(limit, int(runtime_limit))
                batcher = self._batchers[model.model_id] = Batcher(
                    model.runtime, max_batch=limit,
                    max_wait_s=self.settings.batch_max_wait_ms / 1000.0,
                    name=f"batcher-model-{model.model_id}",
                    runners=int(getattr(model.runtime, "parallel_runs", 1) or 1))
            return batcher

    def batchers(self) -> dict[int, Batcher]:
        with self._lock:
            return dict(self._batchers)

    def infer_images(self, model: LoadedModel, job_id: int,
                     images: list[ImageRef]) -> list[ImageResult]:
        batcher = self.batcher_for(model)
        futures: list[Future[ImageResult]] = []
        decodes: list[Future[np.ndarray]] = []
        for image in images:
            out: Future[ImageResult] = Future()
            decode = self.decoder.submit(image.path, model.manifest)
            decode.add_done_callback(partial(_observe_decode, time.perf_counter()))
            decode.add_done_callback(partial(self._to_batcher, batcher, job_id, out))
            futures.append(out)
            decodes.append(decode)
        return _wait_all(images, futures, decodes, float(self.settings.visibility_timeout))

    @staticmethod
    def _to_batcher(batcher: Batcher, job_id: int, out: Future[ImageResult],
                    decode: Future[np.ndarray]) -> None:
        """Runs as soon as an image is decoded: it joins the next batch at once."""
        try:
            tensor = decode.result()
        except CancelledError:
            out.cancel()
            return
        except BaseException as exc:  # noqa: BLE001 - carried to the job's thread
            out.set_exception(exc)
            return
        batcher.submit(tensor, job_id).add_done_callback(partial(_forward, out))

    def infer_shared(self, models: list[LoadedModel], job_id: int,
                     images: list[ImageRef]) -> list[list[ImageResult] | None]:
        """Each of ``models`` on the same images, decoded ONCE with the first model's
        preprocessing (shadow mode: ``models`` must share :func:`same_input`); each decoded
        image joins every model's next batch. The first model's failure raises; another's
        (a shadow version) is logged and gives None."""
        batchers = [self.batcher_for(model) for model in models]
        per_model: list[list[Future[ImageResult]]] = [[] for _ in models]
        decodes: list[Future[np.ndarray]] = []
        for image in images:
            outs: list[Future[ImageResult]] = [Future() for _ in models]
            decode = self.decoder.submit(image.path, models[0].manifest)
            decode.add_done_callback(partial(self._to_batchers, batchers, job_id, outs))
            for futures, out in zip(per_model, outs, strict=True):
                futures.append(out)
            decodes.append(decode)
        timeout = float(self.settings.visibility_timeout)
        first = _wait_all(images, per_model[0], decodes, timeout)
        return [first, *(_others(images, futures, timeout) for futures in per_model[1:])]

    def infer_tensors(self, model: LoadedModel, job_id: int,
                      tensors: list[np.ndarray]) -> list[ImageResult]:
        """Inputs built by the caller (a fusion head's header values and image scores) into
        the model's batcher, as decoded images go."""
        batcher = self.batcher_for(model)
        futures = [batcher.submit(tensor, job_id) for tensor in tensors]
        timeout = float(self.settings.visibility_timeout)
        return [future.result(timeout=timeout) for future in futures]

    @staticmethod
    def _to_batchers(batchers: list[Batcher], job_id: int, outs: list[Future[ImageResult]],
                     decode: Future[np.ndarray]) -> None:
        for batcher, out in zip(batchers, outs, strict=True):
            WorkerPipeline._to_batcher(batcher, job_id, out, decode)

    def commit(self, result: JobResult) -> None:
        self.writer.commit(result, timeout=float(self.settings.visibility_timeout))

    def warm_up(self) -> None:
        """Start the decode processes and load every production model now, so the first jobs
        do not pay for interpreter starts, bundle verification and session creation."""
        self.decoder.warm_up()
        with session_scope(self.settings.sqlalchemy_url) as session:
            models = session.execute(select(Model.id, Model.bundle_path, Model.name).where(
                Model.stage == ModelStage.production)).all()
        for model_id, bundle_path, name in models:
            try:
                self.batcher_for(self.cache.get(model_id, bundle_path))
            except Exception:  # noqa: BLE001 - a broken bundle fails its jobs, not the worker
                log.warning("could not preload model %s (id %s)", name, model_id, exc_info=True)

    def close(self) -> None:
        log.info("decodes: %d run, %d request(s) served by another job's decode",
                 self.decoder.decodes, self.decoder.shared)
        self.heartbeats.close()
        for batcher in self.batchers().values():
            batcher.close()
        self.writer.close()
        self.decoder.close()


def _observe_decode(submitted: float, _future: Future[np.ndarray]) -> None:
    # Submitted to done: the decode process's work plus its queue, what a job waits for.
    metrics.STAGE_SECONDS.labels("decode").observe(time.perf_counter() - submitted)


class InlineRunner:
    """The same contract, synchronous: decode here, one runtime call per job, commit here."""

    def __init__(self, settings: Settings, cache: ModelCache) -> None:
        self.settings, self.cache = settings, cache
        self.heartbeats = Heartbeats(settings)
        self._decoder = InlineDecoder()
        self.decoder = self._decoder  # volume jobs decode their slices through submit_call

    def infer_images(self, model: LoadedModel, job_id: int,
                     images: list[ImageRef]) -> list[ImageResult]:
        decodes = [self._decoder.submit(image.path, model.manifest) for image in images]
        tensors = []
        for image, decode in zip(images, decodes, strict=True):
            try:
                tensors.append(decode.result())
            except PixelDecodeError as exc:
                raise PixelDecodeError(f"instance {image.sop_instance_uid}: {exc}") from exc
        outputs = model.runtime.infer(np.stack(tensors))
        info = BatchInfo(0, len(images), (job_id,))
        return [ImageResult({name: np.asarray(value)[i] for name, value in outputs.items()}, info)
                for i in range(len(images))]

    def infer_shared(self, models: list[LoadedModel], job_id: int,
                     images: list[ImageRef]) -> list[list[ImageResult] | None]:
        decodes = [self._decoder.submit(image.path, models[0].manifest) for image in images]
        tensors = []
        for image, decode in zip(images, decodes, strict=True):
            try:
                tensors.append(decode.result())
            except PixelDecodeError as exc:
                raise PixelDecodeError(f"instance {image.sop_instance_uid}: {exc}") from exc
        batch = np.stack(tensors)
        info = BatchInfo(0, len(images), (job_id,))
        results: list[list[ImageResult] | None] = []
        for number, model in enumerate(models):
            try:
                outputs = model.runtime.infer(batch)
            except Exception as exc:
                if number == 0:
                    raise
                log.warning("shadow inference failed: %s", type(exc).__name__)
                results.append(None)
                continue
            results.append([ImageResult({name: np.asarray(value)[i]
                                         for name, value in outputs.items()}, info)
                            for i in range(len(images))])
        return results

    def infer_tensors(self, model: LoadedModel, job_id: int,
                      tensors: list[np.ndarray]) -> list[ImageResult]:
        if not tensors:
            return []
        outputs = model.runtime.infer(np.stack(tensors))
        info = BatchInfo(0, len(tensors), (job_id,))
        return [ImageResult({name: np.asarray(value)[i] for name, value in outputs.items()}, info)
                for i in range(len(tensors))]

    def commit(self, result: JobResult) -> None:
        write_group(self.settings, [result])

    def close(self) -> None:
        self.heartbeats.close()
