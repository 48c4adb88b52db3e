"""TensorRTRuntime's own logic against a stand-in GPU (fake ``tensorrt`` and ``pycuda``
modules — mocks are for the GPU only): lazy CUDA context in the thread that infers, the
tensor-name API, page-locked staging buffers, chunking above the profile's max batch, a
rebuild when an engine does not deserialize, and ``load_runtime`` when the stand-in's builder
cannot build an engine: ONNX Runtime for that model under ``auto``, a clear error under an
explicit ``tensorrt``; the optimisation profile derived from the manifest (N×C×H×W images,
N×C×D×H×W volume patches, batches up to the batcher's limit). The real TensorRT calls are exercised in tests/test_runtime_tensorrt.py
where TensorRT imports."""

from __future__ import annotations

import json
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lightbox.errors import EngineBuildError, ManifestError
from lightbox.manifest import (
    InputSpec,
    Manifest,
    PreprocessSpec,
    VolumeSpec,
    write_bundle_manifest,
)
from lightbox.settings import Settings
from lightbox.trt_engine import ProfileShapes, profile_shapes
from worker.layout import model_batch_limit
from worker.model_cache import ModelCache
from worker.runtime import load_runtime
from worker.runtime_onnx import OnnxRuntime
from worker.runtime_tensorrt import TensorRTRuntime


class FakeCudaError(Exception):
    """Stands for ``pycuda.driver.Error``, which derives from nothing TensorRT raises."""


class FakeCudaMemoryError(FakeCudaError):
    """Stands for ``pycuda.driver.MemoryError`` (out of GPU memory)."""


class FakeGpu:
    """Device memory as numpy buffers; records what the runtime does."""

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        self.pinned: list[np.ndarray] = []
        self.pushed_in: list[int] = []
        self.input_shapes: list[tuple[int, ...]] = []
        self.addresses: dict[str, int] = {}
        self.unpinned_copies = 0
        self.popped = 0
        # What the builder does: "ok" (an engine), "unsupported operator" (the ONNX parser
        # fails), "no engine" (build_serialized_network returns None), or an exception to raise.
        self.build: object = "ok"
        self.builds = 0
        self.profiles: list[tuple[Any, ...]] = []  # set_shape(name, min, opt, max) calls

    def is_pinned(self, array: np.ndarray) -> bool:
        base = array
        while base.base is not None and isinstance(base.base, np.ndarray):
            base = base.base
        return any(base is p for p in self.pinned)

    def modules(self) -> dict[str, types.ModuleType]:
        gpu = self
        trt = types.ModuleType("tensorrt")
        cuda = types.ModuleType("pycuda.driver")
        pycuda = types.ModuleType("pycuda")
        pycuda.driver = cuda  # type: ignore[attr-defined]

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                self.level = level

        class Context:
            def set_tensor_address(self, name: str, address: int) -> None:
                gpu.addresses[name] = address

            def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
                assert name == "image"
                gpu.input_shapes.append(tuple(shape))
                self.n = shape[0]

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return (self.n, 1)

            def execute_async_v3(self, stream_handle: int) -> bool:
                image = gpu.memory[gpu.addresses["image"]].view(np.float32)
                scores = gpu.memory[gpu.addresses["scores"]].view(np.float32)
                per = image.size // 8
                for i in range(self.n):
                    scores[i] = image[i * per:(i + 1) * per].mean()
                return True

        class Engine:
            num_io_tensors = 2

            def get_tensor_name(self, index: int) -> str:
                return ["image", "scores"][index]

            def get_tensor_mode(self, name: str) -> str:
                return "in" if name == "image" else "out"

            def get_tensor_dtype(self, name: str) -> str:
                return "float"

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return (-1, 1, 4, 4) if name == "image" else (-1, 1)

            def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
                return [(1, 1, 4, 4), (8, 1, 4, 4), (8, 1, 4, 4)]

            def create_execution_context(self) -> Context:
                return Context()

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
                return Engine() if data == b"good engine" else None

        trt.Logger, trt.Runtime = Logger, Runtime  # type: ignore[attr-defined]
        trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")  # type: ignore[attr-defined]
        trt.nptype = lambda dtype: np.float32  # type: ignore[attr-defined]

        class Buffer:
            def __init__(self, nbytes: int) -> None:
                self.address = len(gpu.memory) + 1000
                gpu.memory[self.address] = np.zeros(nbytes, np.uint8)

            def __int__(self) -> int:
                return self.address

        class PrimaryContext:
            def push(self) -> None:
                gpu.pushed_in.append(threading.get_ident())

            def pop(self) -> None:
                gpu.popped += 1

        class Device:
            def __init__(self, index: int) -> None:
                pass

            @staticmethod
            def count() -> int:
                return 1

            def name(self) -> str:
                return "NVIDIA H200"

            def compute_capability(self) -> tuple[int, int]:
                return (9, 0)

            def retain_primary_context(self) -> PrimaryContext:
                return PrimaryContext()

        class OnnxParser:
            num_errors = 1

            def __init__(self, network: Any, logger: Logger) -> None:
                pass

            def parse(self, data: bytes) -> bool:
                assert data.startswith(b"\x08")  # the bundle's real ONNX (ir_version field)
                return gpu.build != "unsupported operator"

            def get_error(self, index: int) -> str:
                return "node ReduceMean: unsupported operator"

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger: Logger) -> None:
                pass

            def create_network(self, flags: int) -> object:
                return object()

            def create_builder_config(self) -> Any:
                return types.SimpleNamespace(set_memory_pool_limit=lambda *a: None,
                                             add_optimization_profile=lambda p: None,
                                             set_flag=lambda flag: None)

            def create_optimization_profile(self) -> Any:
                return types.SimpleNamespace(set_shape=lambda *a: gpu.profiles.append(a))

            def build_serialized_network(self, network: Any, config: Any) -> bytes | None:
                gpu.builds += 1
                if isinstance(gpu.build, Exception):
                    raise gpu.build
                return b"good engine" if gpu.build == "ok" else None

        def pagelocked_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            array = np.empty(shape, dtype)
            gpu.pinned.append(array)
            return array

        def htod(device: Buffer, host: np.ndarray, stream: Any) -> None:
            gpu.unpinned_copies += not gpu.is_pinned(host)
            raw = np.ascontiguousarray(host).view(np.uint8).reshape(-1)
            gpu.memory[int(device)][: raw.size] = raw

        def dtoh(host: np.ndarray, device: Buffer, stream: Any) -> None:
            gpu.unpinned_copies += not gpu.is_pinned(host)
            host.view(np.uint8).reshape(-1)[:] = gpu.memory[int(device)][: host.nbytes]

        cuda.init = lambda: None  # type: ignore[attr-defined]
        cuda.Error, cuda.MemoryError = FakeCudaError, FakeCudaMemoryError  # type: ignore[attr-defined]
        cuda.Device = Device  # type: ignore[attr-defined]
        cuda.pagelocked_empty = pagelocked_empty  # type: ignore[attr-defined]
        cuda.mem_alloc = Buffer  # type: ignore[attr-defined]
        cuda.memcpy_htod_async, cuda.memcpy_dtoh_async = htod, dtoh  # type: ignore[attr-defined]
        cuda.Stream = lambda: types.SimpleNamespace(handle=1, synchronize=lambda: None)  # type: ignore[attr-defined]
        trt.Builder, trt.OnnxParser = Builder, OnnxParser  # type: ignore[attr-defined]
        trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)  # type: ignore[attr-defined]
        trt.BuilderFlag = types.SimpleNamespace(FP16=1, INT8=2)  # type: ignore[attr-defined]
        trt.__version__ = "10.3.0"  # type: ignore[attr-defined]
        return {"tensorrt": trt, "pycuda": pycuda, "pycuda.driver": cuda}


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> FakeGpu:
    fake = FakeGpu()
    for name, module in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return fake


def test_lazy_context_tensor_names_pinned_buffers_and_chunks(gpu: FakeGpu,
                                                             tmp_path: Path) -> None:
    engine = tmp_path / "engine.plan"
    engine.write_bytes(b"good engine")
    runtime = TensorRTRuntime(engine, input_name="image", max_batch=32)
    assert gpu.pushed_in == []  # nothing touches CUDA at construction (worker start)
    batch = np.random.default_rng(0).normal(size=(11, 1, 4, 4)).astype(np.float32)
    results: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: results.update(runtime.infer(batch)))
    thread.start()
    thread.join(30)
    assert gpu.pushed_in == [thread.ident]  # the context lives in the inference thread
    assert runtime.max_batch == 8  # capped by the engine's optimization profile
    assert gpu.input_shapes == [(8, 1, 4, 4), (3, 1, 4, 4)]  # 11 images: two chunks
    assert set(gpu.addresses) == {"image", "scores"}
    assert gpu.unpinned_copies == 0  # every transfer staged through page-locked memory
    np.testing.assert_allclose(results["scores"].reshape(-1),
                               batch.reshape(11, -1).mean(axis=1), rtol=1e-6)
    runtime.infer(batch[:2])
    assert len(gpu.pushed_in) == 1  # set up once per process


def test_engine_that_does_not_deserialize_is_rebuilt_once(gpu: FakeGpu, tmp_path: Path) -> None:
    stale = tmp_path / "stale.plan"
    stale.write_bytes(b"built for another GPU")
    fresh = tmp_path / "fresh.plan"
    rebuilds: list[int] = []

    def rebuild() -> Path:
        rebuilds.append(1)
        fresh.write_bytes(b"good engine")
        return fresh

    runtime = TensorRTRuntime(stale, input_name="image", max_batch=8, rebuild=rebuild)
    out = runtime.infer(np.ones((2, 1, 4, 4), np.float32))
    assert rebuilds == [1] and runtime.engine_path == fresh
    np.testing.assert_allclose(out["scores"].reshape(-1), [1.0, 1.0])


def _bundle(directory: Path) -> Path:
    """A real ONNX model computing what the stand-in engine computes (the mean of each 1×4×4
    image, as ``scores`` shaped (N, 1)), in a bundle with a manifest."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 4, 4])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 1])
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=1),
         helper.make_node("Flatten", ["mean"], ["scores"], axis=1)],
        "mean", [image], [scores])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir(parents=True)
    onnx.save(model, str(directory / "model.onnx"))
    write_bundle_manifest(directory, Manifest(
        name="chest", version="3", architecture="t", input={"height": 4, "width": 4},
        preprocessing={}, labels=["p"], thresholds={"p": 0.5}))
    return directory


def _settings(tmp_path: Path, runtime: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", runtime=runtime, trt_precision="fp32",
                    batch_max_size=8, onnx_threads=1)


BATCH = np.random.default_rng(1).normal(size=(5, 1, 4, 4)).astype(np.float32)
BUILD_FAILURES = {
    "unsupported operator": ("unsupported operator", "cannot parse model.onnx"),
    "no engine": ("no engine", "returned no engine"),
    "out of GPU memory": (FakeCudaMemoryError("cuMemAlloc failed: out of memory"),
                          "FakeCudaMemoryError: cuMemAlloc failed: out of memory"),
}


def _fallback_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "worker.runtime" and r.levelname == "ERROR"]


@pytest.mark.parametrize("build, reason", BUILD_FAILURES.values(), ids=BUILD_FAILURES.keys())
def test_auto_runs_onnxruntime_when_the_engine_cannot_be_built(
        gpu: FakeGpu, tmp_path: Path, caplog: pytest.LogCaptureFixture, build: object,
        reason: str) -> None:
    bundle = _bundle(tmp_path / "bundle")
    gpu.build = build
    with caplog.at_level("ERROR", logger="worker.runtime"):
        runtime = load_runtime("tensorrt", bundle, _settings(tmp_path, "auto"))
    assert gpu.builds == (0 if build == "unsupported operator" else 1)  # it really tried
    assert isinstance(runtime, OnnxRuntime) and runtime.name == "onnxruntime"
    assert runtime.session.get_session_options().intra_op_num_threads == 1  # onnx_threads
    np.testing.assert_array_equal(runtime.infer(BATCH)["scores"],
                                  OnnxRuntime(bundle / "model.onnx", threads=1)
                                  .infer(BATCH)["scores"])
    [message] = _fallback_errors(caplog)
    assert "model chest 3" in message and "EngineBuildError" in message and reason in message
    assert "ONNX Runtime" in message
    assert not list((tmp_path / "data" / "engines").rglob("*.plan"))  # nothing half-written


@pytest.mark.parametrize("build, reason", BUILD_FAILURES.values(), ids=BUILD_FAILURES.keys())
def test_explicit_tensorrt_raises_when_the_engine_cannot_be_built(
        gpu: FakeGpu, tmp_path: Path, caplog: pytest.LogCaptureFixture, build: object,
        reason: str) -> None:
    bundle = _bundle(tmp_path / "bundle")
    gpu.build = build
    with pytest.raises(EngineBuildError) as raised:
        load_runtime("tensorrt", bundle, _settings(tmp_path, "tensorrt"))
    message = str(raised.value)
    assert "TensorRT engine for model chest 3 could not be built" in message
    assert reason in message and "LIGHTBOX_RUNTIME=tensorrt" in message
    assert isinstance(raised.value.__cause__, EngineBuildError)  # what build_engine raised
    if isinstance(build, Exception):  # TensorRT's or pycuda's own error stays chained
        assert raised.value.__cause__.__cause__ is build
    assert not _fallback_errors(caplog)


def test_auto_with_an_engine_that_builds_stays_on_tensorrt(gpu: FakeGpu, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    bundle = _bundle(tmp_path / "bundle")
    settings = _settings(tmp_path, "auto")
    runtime = load_runtime("tensorrt", bundle, settings)
    assert isinstance(runtime, TensorRTRuntime) and runtime.name == "tensorrt"
    assert gpu.builds == 1 and runtime.engine_path.read_bytes() == b"good engine"
    assert runtime.engine_path.name == "engine_fp32_NVIDIA-H200_sm90_trt10.3.0.plan"
    got = runtime.infer(BATCH)["scores"]
    np.testing.assert_allclose(got, OnnxRuntime(bundle / "model.onnx").infer(BATCH)["scores"],
                               rtol=1e-5)
    assert runtime.name == "tensorrt" and gpu.pushed_in  # ran on the (stand-in) GPU
    assert not _fallback_errors(caplog)
    cache = ModelCache(settings, "tensorrt")
    cache.get(1, str(bundle))
    assert cache.runtime_report() == "tensorrt" and gpu.builds == 1  # reused, not rebuilt


@pytest.mark.parametrize("configured", ["auto", "tensorrt"])
def test_engine_that_cannot_be_loaded_or_rebuilt_at_first_batch(
        gpu: FakeGpu, tmp_path: Path, caplog: pytest.LogCaptureFixture, configured: str) -> None:
    """A cached engine that does not deserialize (truncated) and whose rebuild fails: under
    ``auto`` the first batch already runs on ONNX Runtime, and the runtime says so."""
    bundle = _bundle(tmp_path / "bundle")
    settings = _settings(tmp_path, configured)
    engine = load_runtime("tensorrt", bundle, settings).engine_path  # type: ignore[attr-defined]
    engine.write_bytes(b"truncated")
    gpu.build = "no engine"
    runtime = load_runtime("tensorrt", bundle, settings)
    assert isinstance(runtime, TensorRTRuntime)  # the cached engine looked fine on disk
    if configured == "tensorrt":
        with pytest.raises(EngineBuildError, match="returned no engine"):
            runtime.infer(BATCH)
        assert runtime.name == "tensorrt" and not _fallback_errors(caplog)
    else:
        with caplog.at_level("ERROR", logger="worker.runtime"):
            got = runtime.infer(BATCH)["scores"]
        np.testing.assert_array_equal(
            got, OnnxRuntime(bundle / "model.onnx", threads=1).infer(BATCH)["scores"])
        assert runtime.name == "onnxruntime"
        [message] = _fallback_errors(caplog)
        assert "model chest 3" in message and "returned no engine" in message
        runtime.infer(BATCH[:2])
    assert gpu.builds == 2  # the first load, then the one rebuild attempt
    assert gpu.popped == len(gpu.pushed_in) == 1  # the CUDA context was released


def test_worker_row_reports_a_model_that_fell_back(gpu: FakeGpu, tmp_path: Path) -> None:
    """``lightbox status`` shows each worker's runtime from its row; a model on ONNX Runtime
    in a TensorRT worker must show there."""
    settings = _settings(tmp_path, "auto")
    cache = ModelCache(settings, "tensorrt")
    assert cache.runtime_report() == "tensorrt"  # nothing loaded yet
    gpu.build = "unsupported operator"
    loaded = cache.get(1, str(_bundle(tmp_path / "bundle")))
    assert loaded.runtime.name == "onnxruntime"
    assert cache.runtime_report() == "tensorrt+onnxruntime"


def _volume_manifest(mode: str = "sliding_window", roi: tuple[int, int, int] = (16, 32, 48),
                     dynamic_batch: bool = True, declared: tuple[int, int, int] | None = None
                     ) -> Manifest:
    depth, height, width = declared or roi
    return Manifest(
        name="ct-lesion", version="1", architecture="t",
        input=InputSpec(channels=1, depth=depth, height=height, width=width,
                        dynamic_batch=dynamic_batch),
        preprocessing=PreprocessSpec(), labels=["lesion"], thresholds={"lesion": 0.5},
        volume=VolumeSpec(spacing=(1.5, 1.5, 1.5), window_center=40, window_width=400,
                          mode=mode, roi_size=roi))  # type: ignore[arg-type]


def test_profile_of_an_image_model_varies_only_the_batch() -> None:
    manifest = Manifest(name="chest", version="3", architecture="t",
                        input={"channels": 3, "height": 224, "width": 200}, preprocessing={},
                        labels=["p"], thresholds={"p": 0.5})
    assert profile_shapes(manifest, 16) == ProfileShapes(
        "image", (1, 3, 224, 200), (16, 3, 224, 200), (16, 3, 224, 200))


@pytest.mark.parametrize("mode, opt", [("sliding_window", 8), ("fixed", 1)])
def test_profile_of_a_volume_model_is_ncdhw_from_the_roi(mode: str, opt: int) -> None:
    """Sliding window: many patches per series fill batches (tuned for the full batch); fixed
    input: one tensor per series, batches only when series meet (tuned for 1)."""
    profile = profile_shapes(_volume_manifest(mode), 8)
    assert profile.min == (1, 1, 16, 32, 48)
    assert profile.opt == (opt, 1, 16, 32, 48)
    assert profile.max == (8, 1, 16, 32, 48)


def test_profile_without_a_dynamic_batch_axis_is_batch_1() -> None:
    profile = profile_shapes(_volume_manifest(dynamic_batch=False), 8)
    assert profile.min == profile.opt == profile.max == (1, 1, 16, 32, 48)


def test_profile_refuses_an_input_that_disagrees_with_the_roi() -> None:
    with pytest.raises(ManifestError, match=r"differs from volume.roi_size \(8, 32, 48\)"):
        profile_shapes(_volume_manifest(roi=(8, 32, 48), declared=(16, 32, 48)), 4)
    with pytest.raises(ValueError, match="max_batch"):
        profile_shapes(_volume_manifest(), 0)


def test_volume_engine_is_built_with_a_3d_profile_at_the_batchers_limit(
        gpu: FakeGpu, tmp_path: Path) -> None:
    """The worker builds a volume model's engine with the N×C×D×H×W profile, its batch range
    the batcher's limit for that model (3-D patches are capped by input bytes)."""
    from tests.volume_helpers import ROI, oracle_bundle

    bundle = oracle_bundle(tmp_path / "bundle")
    runtime = load_runtime("tensorrt", bundle, _settings(tmp_path, "tensorrt"))
    assert isinstance(runtime, TensorRTRuntime) and gpu.builds == 1
    assert gpu.profiles == [("image", (1, 1, *ROI), (8, 1, *ROI), (8, 1, *ROI))]
    big = _volume_manifest(roi=(128, 128, 128))
    limit = model_batch_limit(big, 32)
    assert limit == 8  # 64 MiB of float32 input ÷ 8 MiB per 128³ patch
    assert profile_shapes(big, limit).max == (8, 1, 128, 128, 128)


def test_engine_cache_rebuilds_when_the_profile_changes(gpu: FakeGpu, tmp_path: Path) -> None:
    """An engine built for other shapes (e.g. the 4-D profile an older build gave a volume
    model) is rebuilt, not reused: the profile is in the engine's record."""
    from tests.volume_helpers import oracle_bundle

    bundle = oracle_bundle(tmp_path / "bundle")
    settings = _settings(tmp_path, "tensorrt")
    load_runtime("tensorrt", bundle, settings)
    [sidecar] = list((tmp_path / "data" / "engines").rglob("*.json"))
    record = json.loads(sidecar.read_text())
    assert record["profile"]["max"] == [8, 1, 8, 24, 24]
    record["profile"] = {"input": "image", "min": [1, 1, 24, 24], "opt": [8, 1, 24, 24],
                         "max": [8, 1, 24, 24]}
    sidecar.write_text(json.dumps(record))
    load_runtime("tensorrt", bundle, settings)
    assert gpu.builds == 2 and len(gpu.profiles) == 2
