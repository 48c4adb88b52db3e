"""The model runtime interface and the choice of implementation.

Every runtime loads a model once and then answers ``infer(batch) -> {output name: array}``
for a float32 batch shaped (N, C, H, W): ONNX Runtime on CPU nodes
(:mod:`worker.runtime_onnx`), TensorRT on GPU nodes (:mod:`worker.runtime_tensorrt`, engines
from :mod:`worker.engine_cache`). ``LIGHTBOX_RUNTIME`` picks one; ``auto`` takes TensorRT when
the node has it (tensorrt and pycuda import, a CUDA device answers) and ONNX Runtime otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from lightbox.errors import ConfigurationError
from lightbox.settings import Settings
from lightbox.trt_engine import tensorrt_available

log = logging.getLogger(__name__)


class ModelRuntime(Protocol):
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
    if kind == "onnxruntime":
        from worker.runtime_onnx import OnnxRuntime

        return OnnxRuntime(bundle_dir / "model.onnx", threads=settings.onnx_threads)
    if kind == "tensorrt":
        from lightbox.manifest import load_manifest
        from worker.engine_cache import EngineCache
        from worker.runtime_tensorrt import TensorRTRuntime

        manifest = load_manifest(bundle_dir, verify=False)  # verified by the model cache
        cache = EngineCache(engine_cache_dir(settings))
        max_batch = settings.batch_max_size

        def engine(rebuild: bool = False) -> Path:
            return cache.engine_for(bundle_dir, manifest, precision=settings.trt_precision,
                                    max_batch=max_batch, rebuild=rebuild)

        return TensorRTRuntime(engine(), input_name=manifest.input.name, max_batch=max_batch,
                               device=settings.trt_device, rebuild=lambda: engine(True))
    raise ConfigurationError(f"unknown runtime {kind!r}")
