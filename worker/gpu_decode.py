"""GPU decoding and preprocessing: compressed frames decoded by nvImageCodec, prepared by CuPy.

Why: on a GPU node the model outruns the cores by far and decoding is the wall (issue 18:
JPEG 2000 is the costliest syntax on the cores). nvImageCodec (nvJPEG2000, nvJPEG) decodes
JPEG 2000, HTJ2K and JPEG on the GPU, and the frame then stays in GPU memory for the
manifest's preprocessing (:mod:`lightbox.prepare_plan`, run with ``xp=cupy``); only the small
model tensor comes back to the host.

Chosen automatically (:func:`make_decoder`): with ``LIGHTBOX_DECODE_DEVICE=auto`` (the default)
when nvImageCodec and CuPy import (the ``gpu-decode`` extra) and a CUDA device answers;
otherwise the decode processes, as on any node. The worker logs ``decode path: gpu|cpu
(<why>)`` once at start and ``lightbox worker --explain-layout`` prints the same.

What takes the GPU path, per image: a 2-D image model's frame in one of :data:`GPU_SYNTAXES`,
grayscale and unsigned, whose preprocessing :func:`lightbox.prepare_plan.plan_for` can
express (a linear window). Everything else goes to the decode processes unchanged
(uncompressed frames too: reading them is most of their cost, and the processes do that well).
Nothing is lost on the way:

- **Per-image fallback**: a frame nvImageCodec cannot decode (``None`` in its batch), a decode
  or CuPy error, or a frame of the wrong shape goes to the decode processes, which give the
  CPU path's answer (or its error); the job goes on. ``fallbacks`` counts them.
- **Overflow**: more than ``max_queue`` images waiting for the GPU, and the next one goes to
  the decode processes: on a node whose cores can decode alongside the GPU, both work.
  ``overflow`` counts them.

JPEG 2000 at reduced resolution: the CPU path decodes only down to the wavelet level the model
input needs; nvImageCodec has no such decode, so the GPU decodes in full and takes the same
low-pass band with the forward wavelet (:mod:`lightbox.prepare_plan`): equal for reversible
(lossless) streams, within a stored unit for irreversible ones.

Why not nvImageCodec's pydicom plugin (``nvidia.nvimgcodec.tools.dicom.pydicom_plugin``): it
makes ``pixel_array`` decode on the GPU one frame per call and copies each full frame back to
the host, where windowing and resizing would again run on a core; here frames are decoded in
batches and stay on the device until they are the model's tensor. Its choices are kept: the
same transfer syntaxes, native bit depth, colour left unchanged.

CuPy and nvImageCodec are imported only here and only when probed: this module imports on any
node, and the worker never imports torch.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from lightbox.manifest import Manifest
from lightbox.pixels import read_dataset
from lightbox.prepare_plan import Plan, execute, first_frame, plan_for
from lightbox.settings import Settings
from worker.decode_pool import DecodePool
from worker.shared_decode import Decoder

log = logging.getLogger(__name__)

# What nvImageCodec's DICOM plugin decodes (nvidia.nvimgcodec.tools.dicom.pydicom_plugin).
GPU_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",  # JPEG Lossless
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",  # HTJ2K
})
# Frames per nvImageCodec call: its throughput grows with the batch (issue 18, the J2K CR on
# an H200: 52, 168, 222 img/s at 1, 8, 64) and the overflow threshold below follows it.
GPU_BATCH = 32
# Images waiting for (or on) the GPU past which the next goes to the decode processes: one
# batch decoding and one read ahead keep the GPU busy; more would only wait there while the
# processes idle (a GPU node keeps ~120 images in flight: worker.layout).
GPU_QUEUE = 2 * GPU_BATCH

Importer = Callable[[str], ModuleType]


def probe(settings: Settings, importer: Importer = importlib.import_module) -> tuple[bool, str]:
    """Whether this node decodes on the GPU, and why (``importer`` is the seam the tests use
    to stand in for the GPU libraries)."""
    if settings.decode_device == "cpu":
        return False, "LIGHTBOX_DECODE_DEVICE=cpu"
    try:
        nvimgcodec = importer("nvidia.nvimgcodec")
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken CUDA library
        return False, f"nvImageCodec not importable ({type(exc).__name__}; the gpu-decode extra)"
    try:
        cupy = importer("cupy")
    except Exception as exc:  # noqa: BLE001
        return False, f"CuPy not importable ({type(exc).__name__}; the gpu-decode extra)"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # noqa: BLE001 - no driver, no device: CUDA raises its own types
        return False, f"no CUDA device ({type(exc).__name__})"
    if count < 1:
        return False, "no CUDA device"
    if not 0 <= settings.trt_device < count:
        return False, f"CUDA device {settings.trt_device} absent ({count} present)"
    version = getattr(nvimgcodec, "__version__", "?")
    return True, f"nvImageCodec {version} on CUDA device {settings.trt_device} of {count}"


class GpuBackend(Protocol):
    """The GPU itself: nvImageCodec + CuPy on a GPU node, a stand-in in the tests."""

    def decode(self, codestreams: list[bytes]) -> list[Any | None]:
        """Each frame decoded (a 2-D or H×W×1 device array), None where it could not be."""
        ...

    def prepare(self, plan: Plan, frames: list[Any]) -> np.ndarray:
        """The plan run on the device over 2-D frames of one shape; the model tensors
        (N, C, H, W) back on the host."""
        ...

    def warm_up(self) -> None: ...


class NvImageCodecBackend:
    """nvImageCodec decodes (in batches; native bit depth, colour unchanged, as the DICOM
    plugin does), CuPy prepares (:func:`lightbox.prepare_plan.execute`)."""

    def __init__(self, device: int = 0) -> None:
        self.device = device
        self._cupy = importlib.import_module("cupy")
        self._nv = importlib.import_module("nvidia.nvimgcodec")
        self._decoder = self._nv.Decoder(device_id=device)
        self._params = self._nv.DecodeParams(allow_any_depth=True,
                                             color_spec=self._nv.ColorSpec.UNCHANGED)

    def decode(self, codestreams: list[bytes]) -> list[Any | None]:
        cupy, nv = self._cupy, self._nv
        with cupy.cuda.Device(self.device):
            images = self._decoder.decode([nv.CodeStream(c) for c in codestreams],
                                          params=self._params)
            frames: list[Any | None] = []
            for image in images:
                if image is None:
                    frames.append(None)
                elif image.buffer_kind == nv.ImageBufferKind.STRIDED_DEVICE:
                    frames.append(cupy.asarray(image))
                else:  # a CPU backend of nvImageCodec took it
                    frames.append(cupy.asarray(np.asarray(image)))
            return frames

    def prepare(self, plan: Plan, frames: list[Any]) -> np.ndarray:
        cupy = self._cupy
        with cupy.cuda.Device(self.device):
            stack = frames[0][None] if len(frames) == 1 else cupy.stack(frames)
            tensors: np.ndarray = cupy.asnumpy(execute(plan, stack, cupy))
            return tensors

    def warm_up(self) -> None:
        with self._cupy.cuda.Device(self.device):
            self._cupy.zeros(1).sum()


@dataclass
class _Item:
    path: str
    manifest: Manifest
    future: Future[np.ndarray]


def _chain(target: Future[np.ndarray], source: Future[np.ndarray]) -> None:
    try:
        if source.cancelled():
            target.cancel()
        elif (exc := source.exception()) is not None:
            target.set_exception(exc)
        else:
            target.set_result(source.result())
    except InvalidStateError:  # the caller cancelled meanwhile: nothing to deliver
        pass


def _cancel_with(source: Future[np.ndarray], target: Future[np.ndarray]) -> None:
    if target.cancelled():
        source.cancel()


class GpuDecoder:
    """``submit(path, manifest) -> Future[tensor]`` like the decode pool, the GPU first.

    One thread reads: it takes up to ``batch`` queued images and reads each file's header and
    compressed frame; another decodes each read batch in one nvImageCodec call and prepares
    each image on the device. Whatever they cannot do goes to ``cpu`` (the decode pool), which
    also does every call :meth:`submit_call` passes on (volume slices)."""

    def __init__(self, cpu: Decoder, backend: GpuBackend, max_queue: int = GPU_QUEUE,
                 batch: int = GPU_BATCH) -> None:
        self.cpu, self.backend = cpu, backend
        self.workers = cpu.workers  # decode processes, as the layout line reports them
        self.max_queue, self.batch = max(0, max_queue), max(1, batch)
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # images queued for or on the GPU
        self.gpu = 0  # images prepared on the GPU
        self.routed = 0  # images the GPU path does not take (syntax, colour, no plan)
        self.fallbacks = 0  # images the GPU failed on, done by the CPU path instead
        self.overflow = 0  # images sent to the CPU path because the GPU queue was full
        # Two threads, so that reading the next batch's files overlaps the GPU's decode of
        # this one; at most two read batches wait for the GPU.
        self._ready: queue.Queue[tuple[list[_Item], list[tuple[_Item, Plan, bytes]]] | None] \
            = queue.Queue(maxsize=2)
        self._threads = [threading.Thread(target=self._read_loop, name="gpu-decode-read",
                                          daemon=True),
                         threading.Thread(target=self._gpu_loop, name="gpu-decode",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    def submit(self, path: str | Path, manifest: Manifest) -> Future[np.ndarray]:
        if manifest.kind != "image" or manifest.volume is not None:
            return self.cpu.submit(path, manifest)
        with self._lock:
            full = self._waiting >= self.max_queue
            if full:
                self.overflow += 1
            else:
                self._waiting += 1
        if full:
            return self.cpu.submit(path, manifest)
        future: Future[np.ndarray] = Future()
        self._queue.put(_Item(str(path), manifest, future))
        return future

    def _to_cpu(self, item: _Item) -> None:
        """The item done by the decode processes: the CPU path's tensor or its error."""
        try:
            source = self.cpu.submit(item.path, item.manifest)
        except Exception as exc:  # noqa: BLE001 - carried to the job like a pool error
            try:
                item.future.set_exception(exc)
            except InvalidStateError:
                pass
            return
        item.future.add_done_callback(lambda target: _cancel_with(source, target))
        source.add_done_callback(lambda done: _chain(item.future, done))

    def _read_loop(self) -> None:
        """The reading thread: batches of queued images, each read on the host (header, plan,
        compressed frame); the others go to the decode processes."""
        while True:
            first = self._queue.get()
            if first is None:
                self._ready.put(None)
                return
            items = [first]
            while len(items) < self.batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                items.append(more)
            try:
                ready = self._read(items)
            except Exception:  # noqa: BLE001 - a bug here must not strand the jobs' images
                log.exception("GPU decode: reading a batch failed; the decode processes "
                              "take its images")
                self._rescue(items)
                ready = []
            if ready:
                self._ready.put((items, ready))  # counted out by the GPU thread
            else:
                self._done(len(items))

    def _gpu_loop(self) -> None:
        """The GPU thread: decode each read batch in one call, prepare each image."""
        while True:
            job = self._ready.get()
            if job is None:
                return
            items, ready = job
            try:
                self._decode(ready)
            except Exception:  # noqa: BLE001 - a bug here must not strand the jobs' images
                log.exception("GPU decode: a batch failed; the decode processes take its "
                              "images")
                self._rescue(items)
            finally:
                self._done(len(items))

    def _done(self, count: int) -> None:
        with self._lock:
            self._waiting -= count

    def _rescue(self, items: list[_Item]) -> None:
        for item in items:
            if not item.future.done():
                self._to_cpu(item)

    def _read(self, items: list[_Item]) -> list[tuple[_Item, Plan, bytes]]:
        ready: list[tuple[_Item, Plan, bytes]] = []
        for item in items:
            if item.future.cancelled():
                continue
            host = self._host_side(item)
            if host is None:
                with self._lock:
                    self.routed += 1
                self._to_cpu(item)
            else:
                ready.append((item, *host))
        return ready

    def _decode(self, ready: list[tuple[_Item, Plan, bytes]]) -> None:
        """Decode and prepare; every image ends with a result, the CPU path's answer, or
        cancelled."""
        try:
            frames = self.backend.decode([codestream for _, _, codestream in ready])
            if len(frames) != len(ready):
                raise RuntimeError(f"{len(frames)} frames for {len(ready)} codestreams")
        except Exception as exc:  # noqa: BLE001 - the CPU path decodes them instead
            log.warning("GPU decode of %d image(s) failed (%s); the decode processes take them",
                        len(ready), type(exc).__name__)
            frames = [None] * len(ready)
        # Frames of one shape and plan (a scanner's images for one model) are prepared
        # together: one pass of kernels for the group instead of one per image.
        groups: dict[tuple[Plan, tuple[int, ...]], list[tuple[_Item, Any]]] = {}
        for (item, plan, _), frame in zip(ready, frames, strict=True):
            flat = _flat(frame)
            if flat is None:
                self._fall_back(item, RuntimeError("nvImageCodec returned no 2-D image"))
            else:
                groups.setdefault((plan, tuple(flat.shape)), []).append((item, flat))
        for (plan, _), members in groups.items():
            self._prepare(plan, members)

    def _host_side(self, item: _Item) -> tuple[Plan, bytes] | None:
        """The plan and the compressed first frame, or None for the CPU path."""
        try:
            ds = read_dataset(item.path)
            if str(ds.file_meta.TransferSyntaxUID) not in GPU_SYNTAXES \
                    or int(ds.get("PixelRepresentation", 0) or 0) != 0:
                return None
            codestream = first_frame(ds)
            plan = plan_for(ds, item.manifest, codestream)
            return None if plan is None else (plan, codestream)
        except Exception:  # noqa: BLE001 - the CPU path reads it again and reports it
            return None

    def _prepare(self, plan: Plan, members: list[tuple[_Item, Any]]) -> None:
        try:
            tensors = self.backend.prepare(plan, [frame for _, frame in members])
            if len(tensors) != len(members):
                raise RuntimeError(f"{len(tensors)} tensors for {len(members)} frames")
        except Exception as exc:  # noqa: BLE001 - per image: the CPU path takes them
            for item, _ in members:
                self._fall_back(item, exc)
            return
        for (item, _), tensor in zip(members, tensors, strict=True):
            if item.future.set_running_or_notify_cancel():
                with self._lock:
                    self.gpu += 1
                item.future.set_result(tensor.copy())  # not a view holding the whole batch

    def _fall_back(self, item: _Item, exc: BaseException) -> None:
        with self._lock:
            self.fallbacks += 1
        log.warning("GPU path failed on an image (%s: %s); the decode processes take it",
                    type(exc).__name__, exc)
        self._to_cpu(item)

    def submit_call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self.cpu.submit_call(fn, *args)

    def warm_up(self) -> None:
        self.backend.warm_up()
        self.cpu.warm_up()

    def close(self) -> None:
        if self._threads[0].is_alive():
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        log.info("GPU decode: %d image(s) on the GPU, %d routed, %d fallback(s), "
                 "%d overflow", self.gpu, self.routed, self.fallbacks, self.overflow)
        self.cpu.close()


def _flat(frame: Any | None) -> Any | None:
    """A decoded frame as 2-D (nvImageCodec gives H × W × 1 for grayscale), else None."""
    if frame is None:
        return None
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame.reshape(frame.shape[0], frame.shape[1])
    return frame if frame.ndim == 2 else None


def make_decoder(settings: Settings, cpu: Decoder | None = None,
                 importer: Importer = importlib.import_module) -> Decoder:
    """The worker's decoder: :class:`GpuDecoder` in front of the decode pool where
    :func:`probe` says yes, else the decode pool; logs which and why."""
    cpu = cpu if cpu is not None else DecodePool(settings.decode_workers)
    ok, why = probe(settings, importer)
    if ok:
        try:
            backend = NvImageCodecBackend(settings.trt_device)
        except Exception as exc:  # noqa: BLE001 - a broken install: the node still works
            ok, why = False, f"nvImageCodec did not start ({type(exc).__name__}: {exc})"
    log.info("decode path: %s (%s)", "gpu" if ok else "cpu", why)
    if not ok:
        return cpu
    return GpuDecoder(cpu, backend)


def describe(settings: Settings) -> str:
    """The line ``lightbox worker --explain-layout`` prints."""
    ok, why = probe(settings)
    return f"decode path: {'gpu' if ok else 'cpu'} ({why})"
