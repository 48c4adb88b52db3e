"""TensorRTRuntime's own logic against a stand-in GPU (fake ``tensorrt`` and ``pycuda``
modules — mocks are for the GPU only): lazy CUDA context in the thread that infers, the
tensor-name API, page-locked staging buffers, chunking above the profile's max batch, and a
rebuild when an engine does not deserialize. The real TensorRT calls are exercised in
tests/test_runtime_tensorrt.py where TensorRT imports."""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.runtime_tensorrt import TensorRTRuntime


class FakeGpu:
    """Device memory as numpy buffers; records what the runtime does."""

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        self.pinned: list[np.ndarray] = []
        self.pushed_in: list[int] = []
        self.input_shapes: list[tuple[int, ...]] = []
        self.addresses: dict[str, int] = {}
        self.unpinned_copies = 0

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
                pass

        class Device:
            def __init__(self, index: int) -> None:
                pass

            def retain_primary_context(self) -> PrimaryContext:
                return PrimaryContext()

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
        cuda.Device = Device  # type: ignore[attr-defined]
        cuda.pagelocked_empty = pagelocked_empty  # type: ignore[attr-defined]
        cuda.mem_alloc = Buffer  # type: ignore[attr-defined]
        cuda.memcpy_htod_async, cuda.memcpy_dtoh_async = htod, dtoh  # type: ignore[attr-defined]
        cuda.Stream = lambda: types.SimpleNamespace(handle=1, synchronize=lambda: None)  # type: ignore[attr-defined]
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
