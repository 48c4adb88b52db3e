"""The TensorRT calls themselves: build an engine from the seed bundle's ONNX (and from a 3-D
sliding-window bundle's, with an N×C×D×H×W profile) through the engine cache, run it behind the
runtime interface, and compare with ONNX Runtime. Skipped, with the
import or device error as the reason, on nodes without TensorRT, pycuda and a CUDA device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightbox.manifest import load_manifest
from lightbox.settings import Settings
from lightbox.trt_engine import (
    current_identity,
    engine_filename,
    profile_shapes,
    tensorrt_available,
)

TRT_OK, TRT_REASON = tensorrt_available()
pytestmark = pytest.mark.skipif(not TRT_OK, reason=f"TensorRT unavailable: {TRT_REASON}")


def test_tensorrt_runtime_matches_onnxruntime(model_bundle: Path, tmp_path: Path) -> None:
    from worker.runtime import load_runtime
    from worker.runtime_onnx import OnnxRuntime

    settings = Settings(data_dir=tmp_path, runtime="tensorrt", trt_precision="fp32",
                        batch_max_size=8)
    manifest = load_manifest(model_bundle)
    runtime = load_runtime("tensorrt", model_bundle, settings)
    engine = tmp_path / "engines"
    assert list(engine.rglob(engine_filename("fp32", current_identity())))
    batch = np.random.default_rng(0).normal(size=(11, 1, manifest.input.height,
                                                  manifest.input.width)).astype(np.float32)
    got = runtime.infer(batch)  # 11 > max batch 8: two chunks through one engine
    want = OnnxRuntime(model_bundle / "model.onnx").infer(batch)
    name = manifest.output_name
    assert got[name].shape == want[name].shape
    assert np.max(np.abs(got[name] - want[name])) < 1e-3
    # The same engine is reused by a second runtime (no rebuild).
    before = {p: p.stat().st_mtime_ns for p in engine.rglob("*.plan")}
    load_runtime("tensorrt", model_bundle, settings)
    assert {p: p.stat().st_mtime_ns for p in engine.rglob("*.plan")} == before


def test_build_engine_fp16_writes_atomically(model_bundle: Path, tmp_path: Path) -> None:
    from lightbox.trt_engine import build_engine

    manifest = load_manifest(model_bundle)
    path = tmp_path / engine_filename("fp16", current_identity())
    build_engine(model_bundle / "model.onnx", path, precision="fp16",
                 profile=profile_shapes(manifest, 4))
    assert path.stat().st_size > 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_volume_engine_has_a_3d_profile_and_matches_onnxruntime(tmp_path: Path) -> None:
    """A sliding-window 3-D bundle: the engine's profile is N×1×D×H×W from the manifest's
    roi_size, batches 1..the batcher's limit; patches give ONNX Runtime's values."""
    import tensorrt as trt

    from tests.volume_helpers import ROI, oracle_bundle
    from worker.runtime import load_runtime
    from worker.runtime_onnx import OnnxRuntime

    bundle = oracle_bundle(tmp_path / "bundle")
    settings = Settings(data_dir=tmp_path / "data", runtime="tensorrt", trt_precision="fp32",
                        batch_max_size=4)
    runtime = load_runtime("tensorrt", bundle, settings)
    [plan] = list((tmp_path / "data" / "engines").rglob("*.plan"))
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
        plan.read_bytes())
    shapes = [tuple(s) for s in engine.get_tensor_profile_shape("image", 0)]
    assert shapes == [(1, 1, *ROI), (4, 1, *ROI), (4, 1, *ROI)]
    patches = np.random.default_rng(2).uniform(0.4, 0.7, size=(6, 1, *ROI)).astype(np.float32)
    got = runtime.infer(patches)["probabilities"]  # 6 > 4: two calls
    want = OnnxRuntime(bundle / "model.onnx").infer(patches)["probabilities"]
    assert got.shape == want.shape == (6, 1, *ROI)
    assert np.max(np.abs(got - want)) < 1e-3
