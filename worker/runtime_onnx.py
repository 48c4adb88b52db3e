"""ONNX Runtime on CPU.

Settings, deliberately:
- intra-op threads default to the node's cores (``LIGHTBOX_ONNX_THREADS``): one batcher thread
  calls the session, one batch at a time, so one call may use every core;
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


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, model_path: Path, threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, outputs, strict=True))
