"""Class-activation heatmaps: written by the worker, read by the exporter.

The worker saves one array per (job, source instance) when the model's manifest names a
``cam_output``; the exporter turns it into a heatmap Secondary Capture. They meet through this
file layout only (no import between worker and scheduler). Maps are stored float16, (labels,
h, w), scaled to 0..1 per map, at the model's output resolution (the consumer resizes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lightbox.settings import Settings


def heatmap_path(settings: Settings, job_id: int, sop_instance_uid: str) -> Path:
    return settings.heatmaps_dir / str(job_id) / f"{sop_instance_uid}.npy"


def normalise(cam: np.ndarray) -> np.ndarray:
    """Scale each map to 0..1 (a flat map becomes zeros)."""
    cam = np.asarray(cam, dtype=np.float32)
    low = cam.min(axis=(-2, -1), keepdims=True)
    span = cam.max(axis=(-2, -1), keepdims=True) - low
    return np.where(span > 0, (cam - low) / np.where(span > 0, span, 1), 0.0)


def save_heatmap(settings: Settings, job_id: int, sop_instance_uid: str, cam: np.ndarray) -> Path:
    """Write atomically (temp file, then rename) so a reader never sees half a map."""
    path = heatmap_path(settings, job_id, sop_instance_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as handle:
        np.save(handle, normalise(cam).astype(np.float16))
    os.replace(tmp, path)
    return path


def load_heatmap(settings: Settings, job_id: int, sop_instance_uid: str) -> np.ndarray | None:
    path = heatmap_path(settings, job_id, sop_instance_uid)
    if not path.is_file():
        # Written before heatmaps moved onto the shared storage (one-machine installs).
        path = settings.data_path / "heatmaps" / str(job_id) / f"{sop_instance_uid}.npy"
    if not path.is_file():
        return None
    heatmap: np.ndarray = np.load(path).astype(np.float32)
    return heatmap
