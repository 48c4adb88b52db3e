"""TensorRT on GPU nodes, behind the same ``infer(batch) -> {output: array}`` interface.

- TensorRT 10 tensor-name API: ``get_tensor_name`` / ``get_tensor_mode``,
  ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``.
- Lazy CUDA: nothing touches CUDA until the first ``infer``, which runs in the batcher's
  runner thread of the worker process (after Celery started it; no fork can follow, the pool is
  ``threads``). That thread retains the device's primary context and keeps it current, so all
  CUDA work happens in one thread of one process.
- The engine is deserialized once per process (the model cache keeps this object).
- Page-locked host buffers (``pagelocked_empty``) sized for the profile's max shape (N×C×H×W
  images or N×C×D×H×W volume patches: the profile from :func:`lightbox.trt_engine.
  profile_shapes` varies only the batch), device buffers bound once, asynchronous copies and
  the launch on one stream, one synchronize.
- An engine that does not deserialize (built for another GPU/TensorRT despite its name, or
  truncated) is rebuilt once through the engine cache instead of failing the job.
- If that still gives no engine (the rebuild fails too), ``fallback`` — given only when the
  runtime was chosen automatically — supplies another runtime (ONNX Runtime) that answers this
  and every later call; ``name`` then reports that runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lightbox.errors import RuntimeUnavailableError, TensorRTUnavailable

if TYPE_CHECKING:
    from worker.runtime import ModelRuntime

log = logging.getLogger(__name__)

# "This node cannot build or load the engine": the project's own errors (EngineBuildError from
# the builder, TensorRTUnavailable from a missing import or an engine that does not
# deserialize) and OSError from the engine cache's files (a full or read-only disk).
ENGINE_FAILURES: tuple[type[Exception], ...] = (RuntimeUnavailableError, OSError)


class TensorRTRuntime:
    name = "tensorrt"

    def __init__(self, engine_path: Path, *, input_name: str, max_batch: int, device: int = 0,
                 rebuild: Callable[[], Path] | None = None,
                 fallback: Callable[[Exception], ModelRuntime] | None = None) -> None:
        self.engine_path = Path(engine_path)
        self.input_name = input_name
        self.max_batch = max_batch
        self.device = device
        self._rebuild = rebuild
        self._fallback = fallback
        self._replacement: ModelRuntime | None = None
        self._ready = False
        self._context_pushed = False
        self._io: dict[str, tuple[Any, Any]] = {}  # name -> (pagelocked host, device buffer)
        self._outputs: list[str] = []

    def _deserialize(self, trt: Any) -> Any:
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None and self._rebuild is not None:
            log.warning("engine %s does not deserialize here; rebuilding", self.engine_path.name)
            self.engine_path = self._rebuild()
            engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise TensorRTUnavailable(f"cannot deserialize engine {self.engine_path.name}")
        self._trt_runtime = runtime  # must outlive the engine
        return engine

    def _setup(self) -> None:
        """First call, in the inference thread: context, engine, buffers, stream."""
        try:
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError as exc:
            raise TensorRTUnavailable(f"tensorrt/pycuda do not import: {exc}") from exc
        cuda.init()
        self._cuda = cuda
        self._context_handle = cuda.Device(self.device).retain_primary_context()
        self._context_handle.push()
        self._context_pushed = True
        engine = self._deserialize(trt)
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = cuda.Stream()
        profile_max = engine.get_tensor_profile_shape(self.input_name, 0)[2]
        self.max_batch = min(self.max_batch, int(profile_max[0]))
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dtype = trt.nptype(engine.get_tensor_dtype(name))
            shape = list(engine.get_tensor_shape(name))
            if name == self.input_name:
                shape = list(profile_max)
            shape[0] = self.max_batch
            if any(dim < 0 for dim in shape[1:]):
                raise TensorRTUnavailable(f"tensor {name} has dynamic non-batch dims {shape}")
            host = cuda.pagelocked_empty(tuple(shape), dtype)
            device_buffer = cuda.mem_alloc(host.nbytes)
            self.context.set_tensor_address(name, int(device_buffer))
            self._io[name] = (host, device_buffer)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                self._outputs.append(name)
        self._ready = True

    def _run_chunk(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        cuda, n = self._cuda, batch.shape[0]
        host_in, device_in = self._io[self.input_name]
        host_in[:n] = batch  # into page-locked memory: the copy below is truly asynchronous
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        cuda.memcpy_htod_async(device_in, host_in[:n], self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        shapes = {}
        for name in self._outputs:
            host, device_buffer = self._io[name]
            shapes[name] = tuple(self.context.get_tensor_shape(name))
            cuda.memcpy_dtoh_async(host[:n], device_buffer, self.stream)
        self.stream.synchronize()
        return {name: self._io[name][0][:n].reshape(shapes[name]).copy() for name in self._outputs}

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._replacement is not None:
            return self._replacement.infer(batch)
        if not self._ready:
            try:
                self._setup()
            except ENGINE_FAILURES as exc:
                self._pop_context()  # a later call (or the fallback) starts clean
                if self._fallback is None:
                    raise
                self._replacement = self._fallback(exc)
                self.name = self._replacement.name
                return self._replacement.infer(batch)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        chunks = [self._run_chunk(batch[i : i + self.max_batch])
                  for i in range(0, batch.shape[0], self.max_batch)]
        if len(chunks) == 1:
            return chunks[0]
        return {name: np.concatenate([c[name] for c in chunks]) for name in self._outputs}

    def _pop_context(self) -> None:
        if self._context_pushed:
            self._context_handle.pop()
            self._context_pushed = False

    def close(self) -> None:
        if self._ready:
            self._io.clear()
            self._pop_context()
            self._ready = False
