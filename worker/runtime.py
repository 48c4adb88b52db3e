"""The model runtime interface and the choice of implementation.

Every runtime loads a model once and then answers ``infer(batch) -> {output name: array}``
for a float32 batch shaped (N, C, H, W). ONNX Runtime serves CPU nodes; a TensorRT runtime
(issue 4) plugs in behind the same interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from lightbox.errors import ConfigurationError
from lightbox.settings import Settings


class ModelRuntime(Protocol):
    name: str

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


def available_runtimes() -> list[str]:
    found = []
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
        raise ConfigurationError(f"runtime {wanted!r} is not available here (have: {have})")
    return wanted


def load_runtime(kind: str, bundle_dir: Path, settings: Settings) -> ModelRuntime:
    if kind == "onnxruntime":
        from worker.runtime_onnx import OnnxRuntime

        return OnnxRuntime(bundle_dir / "model.onnx", threads=settings.onnx_threads)
    raise ConfigurationError(f"unknown runtime {kind!r}")
