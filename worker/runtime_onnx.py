"""ONNX Runtime on CPU.

Settings, deliberately:
- **parallel runs, one thread each** (``LIGHTBOX_ONNX_PARALLEL_RUNS``, ``LIGHTBOX_ONNX_THREADS``;
  by default one run per core, one intra-op thread per run): the worker's batcher gives the
  session that many runner threads (:mod:`worker.batcher`, Triton's model instances), and
  ``InferenceSession.run`` is thread-safe, so the runs share one session and one copy of the
  weights. Measured on the 2-core VM with DenseNet121 at 224² (``bench/pipeline.py`` measures
  both in every run): two single-threaded runs at once did 34–36 images/s at any batch size,
  one run with two intra-op threads 31–33 at its best batch (4) and 22–29 at batch 1–2. An
  intra-op thread pool synchronises at every operator, so a decode process that takes one of
  its cores stalls the whole run; parallel single-threaded runs lose only that core's share;
- inter-op parallelism off (sequential execution): the graphs are chains of operators;
- thread spinning off: between batches the cores belong to the decode processes
  (:mod:`worker.decode_pool`), and spinning ORT threads would burn exactly the CPU that keeps the
  runtime fed;
- full graph optimisation (constant folding, fusions, layout) once, at load.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort


def run_layout(threads: int = 0, parallel_runs: int = 0,
               cores: int | None = None) -> tuple[int, int]:
    """(intra-op threads per run, runs at once) for the node's cores; 0 means "choose".

    Neither set: one single-threaded run per core. One set: the other fills the cores."""
    cores = max(1, cores if cores is not None else (os.cpu_count() or 1))
    if threads <= 0 and parallel_runs <= 0:
        return 1, cores
    if threads <= 0:
        return max(1, cores // parallel_runs), parallel_runs
    if parallel_runs <= 0:
        return threads, max(1, cores // threads)
    return threads, parallel_runs


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, model_path: Path, threads: int = 0, parallel_runs: int = 0) -> None:
        self.threads, self.parallel_runs = run_layout(threads, parallel_runs)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Safe to call from ``parallel_runs`` threads at once (one session, shared)."""
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, outputs, strict=True))
