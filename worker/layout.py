"""How a worker process is sized to its node: the one rule, and why.

Settings left at "auto" (``LIGHTBOX_WORKER_CONCURRENCY``, ``LIGHTBOX_DECODE_WORKERS``,
``LIGHTBOX_BATCH_MAX_SIZE``, ``LIGHTBOX_ONNX_THREADS``/``_PARALLEL_RUNS``: 0;
``LIGHTBOX_BATCH_MAX_WAIT_MS``: negative, since 0 ms is a real choice) are derived here from
the node's cores, whether the model runs on a GPU (TensorRT imports and a CUDA device
answers, :func:`lightbox.trt_engine.tensorrt_available`, and the runtime is not forced to ONNX
Runtime), and the model; an explicit setting always wins. ``lightbox worker --explain-layout``
prints the result.

The rule (C = cores):

- **GPU node** (the model runs off the cores, decoding is the wall): decode processes C − 1
  from 4 cores up (one core stays with the worker process: Celery threads, batchers, result
  unpickling, the writer), else C; jobs in flight 4 × decode processes, at least 16, at most
  128 (each decode process keeps a couple of images queued, and a study brings ~2 images,
  so the pool never waits for a job to be claimed); batches of up to 64 (a GPU's throughput
  still grows past 32) with a 5 ms wait (the device is far faster than decoding, so waiting
  longer only adds latency).
- **CPU node** (model and decoding share the cores): decode processes C; ONNX Runtime one
  single-threaded run per core (:func:`worker.runtime_onnx.run_layout`); jobs in flight
  2 × C, at least 8, at most 128, so every run finds images to batch (16 cores with 8 jobs
  made batches of 1.9 images); batches of up to 16 (a CPU run gains little past 8–16) with a
  10 ms wait.
- **The model**: a model without a dynamic batch axis runs one image per call (the
  pipeline's batcher), and a batch never holds more than 64 MiB of input
  (:func:`model_batch_limit`: 3D volumes, large inputs).

What it gives: 16 cores with a GPU: 15 decode processes, 60 jobs, batch 64, 5 ms; without: 16
decode processes, 16 × 1-thread ONNX runs, 32 jobs, batch 16, 10 ms. 64 cores with a GPU: 63,
128, 64, 5 ms; without: 64, 64 × 1, 128, 16, 10 ms. 2 cores (this project's VM): 2, 2 × 1, 8,
16, 10 ms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

from lightbox.manifest import Manifest
from lightbox.settings import Settings
from lightbox.trt_engine import tensorrt_available

MAX_BATCH_INPUT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Layout:
    cores: int
    gpu: bool
    worker_concurrency: int
    decode_workers: int
    batch_max_size: int
    batch_max_wait_ms: float
    onnx_threads: int
    onnx_parallel_runs: int
    why: dict[str, str] = field(default_factory=dict)

    def explain(self) -> str:
        node = f"{self.cores} core(s), " + ("a GPU (TensorRT + CUDA device)" if self.gpu
                                             else "no GPU: the model runs on the cores")
        lines = [f"node: {node}"]
        for name in ("worker_concurrency", "decode_workers", "batch_max_size",
                     "batch_max_wait_ms", "onnx_threads", "onnx_parallel_runs"):
            value = getattr(self, name)
            lines.append(f"  {name} = {value:g}  ({self.why.get(name, '')})")
        return "\n".join(lines)


@lru_cache(maxsize=1)
def _gpu_present() -> tuple[bool, str]:
    return tensorrt_available()


def gpu_runs_model(settings: Settings) -> tuple[bool, str]:
    """Whether this node's models run on a GPU, and why (the detection is done once)."""
    if settings.runtime == "onnxruntime":
        return False, "LIGHTBOX_RUNTIME=onnxruntime"
    return _gpu_present()


def node_layout(settings: Settings, cores: int | None = None,
                gpu: bool | None = None) -> Layout:
    """The layout for ``cores`` (default: this node's) with or without a GPU (default:
    detected); settings other than auto are kept and said to be explicit."""
    cores = max(1, cores if cores is not None else (os.cpu_count() or 1))
    gpu = gpu_runs_model(settings)[0] if gpu is None else gpu
    why: dict[str, str] = {}

    def pick(name: str, auto: float, reason: str, explicit: bool) -> float:
        if explicit:
            why[name] = "explicit setting"
            return float(getattr(settings, name))
        why[name] = reason
        return auto

    if gpu:
        decode = cores - 1 if cores >= 4 else cores
        decode_why = ("GPU node: cores − 1, one core left to the worker process"
                      if cores >= 4 else "GPU node under 4 cores: every core decodes")
    else:
        decode, decode_why = cores, "CPU node: one per core (shared with the model's runs)"
    decode_workers = int(pick("decode_workers", decode, decode_why, settings.decode_workers > 0))
    if gpu:
        concurrency = min(128, max(16, 4 * decode_workers))
        conc_why = "GPU node: 4 × decode processes, 16 to 128"
        batch, batch_why = 64, "GPU node: a GPU's throughput still grows past 32"
        wait, wait_why = 5.0, "GPU node: the device outruns decoding; waiting adds latency"
    else:
        concurrency = min(128, max(8, 2 * cores))
        conc_why = "CPU node: 2 × cores, 8 to 128, so every ONNX run finds images to batch"
        batch, batch_why = 16, "CPU node: a CPU run gains little past 8-16 images"
        wait, wait_why = 10.0, "CPU node: a fuller batch is worth 10 ms"
    worker_concurrency = int(pick("worker_concurrency", concurrency, conc_why,
                                  settings.worker_concurrency > 0))
    batch_max_size = int(pick("batch_max_size", batch, batch_why, settings.batch_max_size > 0))
    batch_max_wait_ms = pick("batch_max_wait_ms", wait, wait_why,
                             settings.batch_max_wait_ms >= 0)
    from worker.runtime_onnx import run_layout

    threads, runs = run_layout(settings.onnx_threads, settings.onnx_parallel_runs, cores)
    why["onnx_threads"] = ("explicit setting" if settings.onnx_threads > 0 else
                           "one intra-op thread per run" if settings.onnx_parallel_runs <= 0
                           else "cores ÷ runs")
    why["onnx_parallel_runs"] = ("explicit setting" if settings.onnx_parallel_runs > 0 else
                                 "one run per core" if settings.onnx_threads <= 0
                                 else "cores ÷ threads")
    if gpu:
        for name in ("onnx_threads", "onnx_parallel_runs"):
            why[name] += "; used only if a model falls back to ONNX Runtime"
    return Layout(cores, gpu, worker_concurrency, decode_workers, batch_max_size,
                  batch_max_wait_ms, threads, runs, why)


def sized_settings(settings: Settings, layout: Layout | None = None) -> Settings:
    """``settings`` with every auto value replaced by the layout's (idempotent)."""
    layout = layout or node_layout(settings)
    return settings.model_copy(update={
        "worker_concurrency": layout.worker_concurrency, "decode_workers": layout.decode_workers,
        "batch_max_size": layout.batch_max_size, "batch_max_wait_ms": layout.batch_max_wait_ms,
        "onnx_threads": layout.onnx_threads, "onnx_parallel_runs": layout.onnx_parallel_runs})


def model_batch_limit(manifest: Manifest, configured: int) -> int:
    """The model's share of the rule: one image per call without a dynamic batch axis, and
    no batch over :data:`MAX_BATCH_INPUT_BYTES` of float32 input."""
    if not manifest.input.dynamic_batch:
        return 1
    shape = [manifest.input.channels, manifest.input.height, manifest.input.width]
    depth = getattr(manifest.input, "depth", None)
    if isinstance(depth, int) and depth > 0:
        shape.append(depth)
    one = 4
    for side in shape:
        one *= max(1, int(side))
    return max(1, min(configured, MAX_BATCH_INPUT_BYTES // one))
