"""Building and naming TensorRT engines: one implementation for ``lightbox compile`` (trainer)
and the worker's engine cache (:mod:`worker.engine_cache`).

A serialized TensorRT engine is only valid for the GPU model (compute capability) and the
TensorRT version that built it, so every engine file carries both in its name
(:func:`engine_filename`). TensorRT and pycuda are imported lazily inside functions: this
module imports on nodes without a GPU, and :func:`tensorrt_available` says why one cannot be
used instead of raising.

Uses the TensorRT 10 API only: explicit-batch networks (the default in 10), optimization
profiles for the dynamic batch dimension, ``build_serialized_network``.
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

from lightbox.errors import EngineBuildError, TensorRTUnavailable

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
    onnx_path: Path, engine_path: Path, *, precision: Precision, max_batch: int,
    input_name: str, input_shape: tuple[int, int, int],
    calibration_batches: Iterable[np.ndarray] | None = None,
    calibration_cache: Path | None = None,
) -> Path:
    """Build a TensorRT engine from ``onnx_path`` and write it to ``engine_path`` atomically.

    The input's batch dimension gets one optimization profile: min 1, opt and max
    ``max_batch`` (the worker's batcher aims for full batches, so tune for them). ``fp16`` and
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
        serialized = _serialized_engine(Path(onnx_path), precision, max_batch, input_name,
                                        input_shape, calibration_batches, calibration_cache)
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
    log.info("built TensorRT %s engine %s (max batch %d)", precision, engine_path.name, max_batch)
    return engine_path


def _serialized_engine(
    onnx_path: Path, precision: Precision, max_batch: int, input_name: str,
    input_shape: tuple[int, int, int], calibration_batches: Iterable[np.ndarray] | None,
    calibration_cache: Path | None,
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
    profile = builder.create_optimization_profile()
    channels, height, width = input_shape
    profile.set_shape(input_name, (1, channels, height, width),
                      (max_batch, channels, height, width), (max_batch, channels, height, width))
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8") and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _calibrator(calibration_batches or [], calibration_cache,
                                             input_name)
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:  # the builder's reason went to the TensorRT logger (WARNING+)
        raise EngineBuildError(f"TensorRT returned no engine for {onnx_path.name} "
                               f"(see the TensorRT log above)")
    return bytes(serialized)
