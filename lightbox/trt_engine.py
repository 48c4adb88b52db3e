"""Building and naming TensorRT engines: one implementation for ``lightbox compile`` (trainer)
and the worker's engine cache (:mod:`worker.engine_cache`).

A serialized TensorRT engine is only valid for the GPU model (compute capability) and the
TensorRT version that built it, so every engine file carries both in its name
(:func:`engine_filename`). TensorRT and pycuda are imported lazily inside functions: this
module imports on nodes without a GPU, and :func:`tensorrt_available` says why one cannot be
used instead of raising.

Uses the TensorRT 10 API only: explicit-batch networks (the default in 10), one optimization
profile whose shapes come from the manifest (:func:`profile_shapes`: N×C×H×W for images,
N×C×D×H×W for volume models), ``build_serialized_network``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightbox.errors import EngineBuildError, ManifestError, TensorRTUnavailable
from lightbox.manifest import Manifest

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
WORKSPACE_BYTES = 2 << 30  # 2 GiB of builder scratch: ample for classification CNNs


@dataclass(frozen=True)
class GpuIdentity:
    """What a serialized engine is bound to: the GPU model and the TensorRT version."""

    gpu_name: str  # e.g. "NVIDIA H200"
    compute_capability: str  # e.g. "9.0"
    tensorrt_version: str  # e.g. "10.3.0"

    def slug(self) -> str:
        """Filesystem-safe, e.g. ``NVIDIA-H200_sm90_trt10.3.0``."""
        name = re.sub(r"[^A-Za-z0-9.]+", "-", self.gpu_name).strip("-") or "gpu"
        sm = self.compute_capability.replace(".", "")
        version = re.sub(r"[^A-Za-z0-9.]+", "-", self.tensorrt_version)
        return f"{name}_sm{sm}_trt{version}"


@dataclass(frozen=True)
class ProfileShapes:
    """The input's optimization profile: the smallest, the tuned-for and the largest shape."""

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def as_dict(self) -> dict[str, object]:
        return {"input": self.input_name, "min": list(self.min), "opt": list(self.opt),
                "max": list(self.max)}


def profile_shapes(manifest: Manifest, max_batch: int) -> ProfileShapes:
    """The profile for ``manifest``'s input with batches of 1..``max_batch`` (the batcher's
    largest call for this model; 1 when the model has no dynamic batch axis).

    Only the batch varies: images are C×H×W; volume models take C×D×H×W patches of the
    manifest's ``roi_size`` (sliding window: the worker pads every patch to it; fixed input:
    the volume is cropped/padded to it), so one profile covers every call and TensorRT can tune
    its 3-D kernels for that one spatial size. ``opt``: sliding window and images fill whole
    batches (a series gives many patches, the batcher aims for full batches), so tune for
    ``max_batch``; a fixed-input volume model gets one input per series and a batch only when
    several series meet in the batcher, so tune for 1."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, not {max_batch}")
    spec = manifest.input
    largest = max_batch if spec.dynamic_batch else 1
    volume = manifest.volume
    if volume is None:
        sample: tuple[int, ...] = (spec.channels, spec.height, spec.width)
        opt = largest
    else:
        roi = tuple(int(n) for n in volume.roi_size)
        declared = (spec.depth if spec.depth is not None else roi[0], spec.height, spec.width)
        if declared != roi:
            raise ManifestError(
                f"model {manifest.name} {manifest.version}: input depth×height×width "
                f"{declared} differs from volume.roi_size {roi}")
        sample = (spec.channels, *roi)
        opt = largest if volume.mode == "sliding_window" else 1
    return ProfileShapes(spec.name, (1, *sample), (opt, *sample), (largest, *sample))


def tensorrt_available() -> tuple[bool, str]:
    """(ok, reason). Never raises: the reason names the missing import or device."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        return False, f"tensorrt does not import: {type(exc).__name__}: {exc}"
    try:
        import pycuda.driver as cuda
    except Exception as exc:  # noqa: BLE001
        return False, f"pycuda does not import: {type(exc).__name__}: {exc}"
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # noqa: BLE001 - no driver, no device
        return False, f"CUDA driver unusable: {type(exc).__name__}: {exc}"
    if count < 1:
        return False, "no CUDA device on this node"
    return True, "ok"


def current_identity(device: int = 0) -> GpuIdentity:
    """The identity of CUDA device ``device`` with the installed TensorRT.

    Reads device properties through the driver API without creating a context, so it is safe
    to call in a process that has not started inference yet."""
    ok, reason = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(reason)
    import pycuda.driver as cuda
    import tensorrt as trt

    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return GpuIdentity(gpu_name=str(dev.name()), compute_capability=f"{major}.{minor}",
                       tensorrt_version=str(trt.__version__))


def engine_filename(precision: str, identity: GpuIdentity) -> str:
    """``engine_<precision>_<slug>.plan``: one file per precision, GPU model and TRT version."""
    return f"engine_{precision}_{identity.slug()}.plan"


def _calibrator(batches: Iterable[np.ndarray], cache: Path | None, input_name: str) -> Any:
    """An ``IInt8EntropyCalibrator2`` fed from preprocessed float32 NCHW batches."""
    import pycuda.autoinit  # noqa: F401 - the builder process needs a context for calibration
    import pycuda.driver as cuda
    import tensorrt as trt

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self._batches: Iterator[np.ndarray] = iter(batches)
            self._device: Any = None
            self._size = 0
            self._batch_size = 1

        def get_batch_size(self) -> int:
            return self._batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                batch = np.ascontiguousarray(next(self._batches), dtype=np.float32)
            except StopIteration:
                return None
            if self._device is None or batch.nbytes > self._size:
                self._device = cuda.mem_alloc(batch.nbytes)
                self._size = batch.nbytes
            self._batch_size = batch.shape[0]
            cuda.memcpy_htod(self._device, batch)
            return [int(self._device)]

        def read_calibration_cache(self) -> bytes | None:
            if cache is not None and cache.is_file():
                return cache.read_bytes()
            return None

        def write_calibration_cache(self, data: bytes) -> None:
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(cache, bytes(data))

    return _EntropyCalibrator()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def build_engine(
    onnx_path: Path, engine_path: Path, *, precision: Precision, profile: ProfileShapes,
    calibration_batches: Iterable[np.ndarray] | None = None,
    calibration_cache: Path | None = None,
) -> Path:
    """Build a TensorRT engine from ``onnx_path`` and write it to ``engine_path`` atomically.

    The input gets one optimization profile, ``profile`` (see :func:`profile_shapes`: images
    and 3-D volume patches alike, only the batch dimension varying). ``fp16`` and
    ``int8`` are requested only when the GPU has fast kernels for them; ``int8`` needs
    calibration data (or an existing calibration cache).

    Raises :class:`TensorRTUnavailable` when TensorRT cannot be used at all, ``ValueError`` for
    ``int8`` without calibration data, and :class:`EngineBuildError` for every failure of the
    build itself, so the worker can fall back to ONNX Runtime for this one model."""
    ok, reason = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(reason)
    if precision == "int8" and calibration_batches is None and not (
            calibration_cache and calibration_cache.is_file()):
        raise ValueError("int8 needs calibration_batches or an existing calibration_cache")
    try:
        serialized = _serialized_engine(Path(onnx_path), precision, profile,
                                        calibration_batches, calibration_cache)
        engine_path = Path(engine_path)
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(engine_path, serialized)
    except EngineBuildError:
        raise
    except Exception as exc:  # noqa: BLE001 - wrapped, not swallowed: see below
        # TensorRT (pybind11: RuntimeError, ValueError, MemoryError; AttributeError when its
        # API moved), pycuda (pycuda.driver.Error) and the file system (OSError) have no
        # common base; the cause stays chained and its type is named in the message.
        raise EngineBuildError(f"building a TensorRT {precision} engine from "
                               f"{Path(onnx_path).name} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
    log.info("built TensorRT %s engine %s (input %s: min %s, opt %s, max %s)", precision,
             engine_path.name, profile.input_name, profile.min, profile.opt, profile.max)
    return engine_path


def _serialized_engine(
    onnx_path: Path, precision: Precision, profile: ProfileShapes,
    calibration_batches: Iterable[np.ndarray] | None, calibration_cache: Path | None,
) -> bytes:
    """Parse, configure and build; the bytes of the serialized engine."""
    import tensorrt as trt

    trt_log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_log)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_log)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    shapes = builder.create_optimization_profile()
    shapes.set_shape(profile.input_name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(shapes)
    if precision in ("fp16", "int8") and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _calibrator(calibration_batches or [], calibration_cache,
                                             profile.input_name)
        config.set_calibration_profile(shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:  # the builder's reason went to the TensorRT logger (WARNING+)
        raise EngineBuildError(f"TensorRT returned no engine for {onnx_path.name} "
                               f"(see the TensorRT log above)")
    return bytes(serialized)
