"""A stand-in accelerator for ``bench.pipeline``: the one thing that cannot run here (a GPU).

Why: on this machine the model and the decoding share the same CPU cores, so Lightbox's
efficiency against the bare runtime measures how much CPU decoding takes, not how well the
pipeline keeps a model busy. On a GPU node the model runs off the cores. This stand-in runs
off them too: each call *sleeps* for its images at the rate ``bench.pipeline`` gives it (the
bare runtime's, measured on this machine in the same run), one call at a time as a GPU with
one execution context runs them, then returns zero scores. It computes nothing, so its
figures say only whether decode, queue, batching and database keep such a device busy; they
are labelled as a stand-in everywhere and are no GPU figures.

    .venv/bin/python -m bench.offcpu    # a `lightbox worker` whose models run on the stand-in

``BENCH_OFFCPU_SECONDS_PER_IMAGE`` gives the service time of one image.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from lightbox.manifest import load_manifest
from lightbox.settings import Settings, get_settings

SERVICE_ENV = "BENCH_OFFCPU_SECONDS_PER_IMAGE"


class OffCpuRuntime:
    """``infer`` takes its images' service time off the CPU and answers zeros of the right
    shapes; one call at a time (``parallel_runs`` 1), like TensorRT's execution context."""

    name = "offcpu-standin"
    parallel_runs = 1

    def __init__(self, seconds_per_image: float, outputs: dict[str, tuple[int, ...]]) -> None:
        self.seconds_per_image, self.outputs = seconds_per_image, outputs

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(len(batch) * self.seconds_per_image)
        return {name: np.zeros((len(batch), *shape), np.float32)
                for name, shape in self.outputs.items()}


def load_offcpu(kind: str, bundle_dir: Path, settings: Settings) -> OffCpuRuntime:
    """A :data:`~worker.model_cache.RuntimeLoader`: the stand-in for any bundle (``kind`` is
    the runtime the node would have chosen; it is ignored)."""
    manifest = load_manifest(bundle_dir, verify=False)  # the model cache verified it
    return OffCpuRuntime(float(os.environ[SERVICE_ENV]),
                         {manifest.output_name: (len(manifest.labels),)})


def main() -> None:
    from lightbox.logs import setup_logging
    from worker.tasks import run_worker

    settings = get_settings()
    setup_logging(settings)  # the bench migrated the database already
    run_worker(settings, loglevel=settings.log_level.upper(), loader=load_offcpu)


if __name__ == "__main__":
    main()
