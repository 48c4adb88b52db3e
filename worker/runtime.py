"""The model runtime interface and the choice of implementation.

Every runtime loads a model once and then answers ``infer(batch) -> {output name: array}``
for a float32 batch shaped (N, C, H, W): ONNX Runtime on CPU nodes
(:mod:`worker.runtime_onnx`), TensorRT on GPU nodes (:mod:`worker.runtime_tensorrt`, engines
from :mod:`worker.engine_cache`). ``LIGHTBOX_RUNTIME`` picks one; ``auto`` takes TensorRT when
the node has it (tensorrt and pycuda import, a CUDA device answers) and ONNX Runtime otherwise.

A TensorRT node may still be unable to build or load the engine of one model (an operator its
ONNX parser rejects, no engine from the builder, out of GPU memory while building). With
``auto`` that model runs on ONNX Runtime instead, after an ERROR naming the model, so its jobs
go on; with ``tensorrt`` set explicitly the operator asked for TensorRT only, so loading fails
with :class:`~lightbox.errors.EngineBuildError` saying why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from lightbox.errors import ConfigurationError, EngineBuildError
from lightbox.settings import Settings
from lightbox.trt_engine import tensorrt_available

if TYPE_CHECKING:
    from lightbox.manifest import Manifest

log = logging.getLogger(__name__)


class ModelRuntime(Protocol):
    """``name`` is reported by ``lightbox status``. Optional attributes the batcher reads:
    ``max_batch`` (the most images one call takes) and ``parallel_runs`` (how many threads may
    call ``infer`` at once; 1 when absent, as for TensorRT's one execution context)."""

    name: str

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


def available_runtimes() -> list[str]:
    """Runtimes this node can use, best first."""
    found = []
    ok, reason = tensorrt_available()
    if ok:
        found.append("tensorrt")
    else:
        log.debug("TensorRT not available: %s", reason)
    try:
        import onnxruntime  # noqa: F401

        found.append("onnxruntime")
    except ImportError:
        pass
    return found


def choose_runtime(settings: Settings) -> str:
    """The configured runtime, or with ``auto`` the best one this node has."""
    have = available_runtimes()
    wanted = settings.runtime
    if wanted == "auto":
        if not have:
            raise ConfigurationError("no model runtime installed (need onnxruntime)")
        return have[0]
    if wanted not in have:
        reason = tensorrt_available()[1] if wanted == "tensorrt" else "not installed"
        raise ConfigurationError(
            f"runtime {wanted!r} is not available here (have: {have}; {reason})")
    return wanted


def engine_cache_dir(settings: Settings) -> Path:
    return settings.engine_cache_dir or settings.data_path / "engines"


def load_runtime(kind: str, bundle_dir: Path, settings: Settings) -> ModelRuntime:
    """The runtime ``kind`` for the bundle in ``bundle_dir`` (ONNX Runtime instead of
    TensorRT for a model whose engine cannot be built or loaded, when ``auto`` chose it)."""
    if kind == "onnxruntime":
        return _onnx_runtime(bundle_dir, settings)
    if kind == "tensorrt":
        return _tensorrt_runtime(bundle_dir, settings)
    raise ConfigurationError(f"unknown runtime {kind!r}")


def _onnx_runtime(bundle_dir: Path, settings: Settings) -> ModelRuntime:
    from worker.runtime_onnx import OnnxRuntime

    return OnnxRuntime(bundle_dir / "model.onnx", threads=settings.onnx_threads,
                       parallel_runs=settings.onnx_parallel_runs)


def _tensorrt_runtime(bundle_dir: Path, settings: Settings) -> ModelRuntime:
    from lightbox.manifest import load_manifest
    from worker.engine_cache import EngineCache
    from worker.layout import model_batch_limit
    from worker.runtime_tensorrt import ENGINE_FAILURES, TensorRTRuntime

    manifest = load_manifest(bundle_dir, verify=False)  # verified by the model cache
    cache = EngineCache(engine_cache_dir(settings))
    # The batcher's largest call for this model (3-D patches are capped by input bytes): the
    # engine's profile is built for exactly that batch range.
    max_batch = model_batch_limit(manifest, settings.batch_max_size)
    automatic = settings.runtime == "auto"

    def engine(rebuild: bool = False) -> Path:
        return cache.engine_for(bundle_dir, manifest, precision=settings.trt_precision,
                                max_batch=max_batch, rebuild=rebuild)

    def fall_back(exc: Exception) -> ModelRuntime:
        return _onnx_instead_of_tensorrt(bundle_dir, manifest, settings, exc)

    try:
        built = engine()
    except ENGINE_FAILURES as exc:
        if automatic:
            return fall_back(exc)
        raise EngineBuildError(
            f"the TensorRT engine for model {manifest.name} {manifest.version} could not be "
            f"built or loaded on this node: {type(exc).__name__}: {exc} "
            f"(LIGHTBOX_RUNTIME={settings.runtime}, so no fallback to ONNX Runtime; set it to "
            f"auto to allow one)") from exc
    # Deserializing waits for the first batch (in the batcher thread); the fallback covers it.
    return TensorRTRuntime(built, input_name=manifest.input.name, max_batch=max_batch,
                           device=settings.trt_device, rebuild=lambda: engine(True),
                           fallback=fall_back if automatic else None)


def _onnx_instead_of_tensorrt(bundle_dir: Path, manifest: Manifest, settings: Settings,
                              exc: Exception) -> ModelRuntime:
    """ONNX Runtime for a model whose TensorRT engine cannot be built or loaded here.

    Logged at ERROR: the node is slower than it should be for this model until someone fixes
    TensorRT (or the model). The message carries the model and the exception only."""
    log.error("TensorRT engine for model %s %s could not be built or loaded (%s: %s); "
              "running this model on ONNX Runtime instead", manifest.name, manifest.version,
              type(exc).__name__, exc)
    return _onnx_runtime(bundle_dir, settings)
