"""A stand-in accelerator for ``bench.pipeline``: the one thing that cannot run here (a GPU).

Why: on this machine the model and the decoding share the same CPU cores, so Lightbox's
efficiency against the bare runtime measures how much CPU decoding takes, not how well the
pipeline keeps a model busy. On a GPU node the model runs off the cores. This stand-in runs
off them too: each call *sleeps* for the time ``bench.pipeline`` gives it for a batch of that
size (from the bare runtime it measured on this machine in the same run), one call at a time
as a GPU with one execution context runs them, then returns zero scores. It computes
nothing, so its figures say only whether decode, queue, batching and database keep such a
device busy; they are labelled as a stand-in everywhere and are no GPU figures.

    .venv/bin/python -m bench.offcpu    # a `lightbox worker` whose models run on the stand-in

``BENCH_OFFCPU_SERVICE`` (JSON ``{"batch size": seconds per call}``) gives the service times;
a batch size not listed takes the per-image time of the nearest listed size above it (of the
largest, past them all).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from lightbox.manifest import load_manifest
from lightbox.settings import Settings, get_settings

SERVICE_ENV = "BENCH_OFFCPU_SERVICE"


class OffCpuRuntime:
    """``infer`` takes the measured service time off the CPU and answers zeros of the right
    shapes; one call at a time (``parallel_runs`` 1), like TensorRT's execution context."""

    name = "offcpu-standin"
    parallel_runs = 1

    def __init__(self, service_s: dict[int, float], outputs: dict[str, tuple[int, ...]]) -> None:
        if not service_s:
            raise ValueError("no service times")
        self.per_image = {size: seconds / size for size, seconds in sorted(service_s.items())}
        self.outputs = outputs
        self.max_batch = max(self.per_image)

    def service_time(self, size: int) -> float:
        """Seconds a call of ``size`` images takes."""
        measured = next((m for m in self.per_image if m >= size), self.max_batch)
        return size * self.per_image[measured]

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(self.service_time(len(batch)))
        return {name: np.zeros((len(batch), *shape), np.float32)
                for name, shape in self.outputs.items()}


def load_offcpu(kind: str, bundle_dir: Path, settings: Settings) -> OffCpuRuntime:
    """A :data:`~worker.model_cache.RuntimeLoader`: the stand-in for any bundle (``kind`` is
    the runtime the node would have chosen; it is ignored)."""
    manifest = load_manifest(bundle_dir, verify=False)  # the model cache verified it
    service = {int(k): float(v) for k, v in json.loads(os.environ[SERVICE_ENV]).items()}
    return OffCpuRuntime(service, {manifest.output_name: (len(manifest.labels),)})


def main() -> None:
    from lightbox.commands.common import setup_logging
    from worker.tasks import run_worker

    settings = get_settings()
    setup_logging(settings)  # the bench migrated the database already
    run_worker(settings, loglevel=settings.log_level.upper(), loader=load_offcpu)


if __name__ == "__main__":
    main()
