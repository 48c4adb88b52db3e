"""Preparation without Lightbox's reductions: what a straightforward pipeline does.

The whole frame is decoded (pydicom and its plugins, every pixel), windowed and area-resized
by the same manifest-driven steps as :func:`lightbox.preprocess.prepare_file`, but without the
reduced-resolution JPEG 2000 decode and the block means before the window. The benchmarks use
it as the baseline of what those reductions save (bench.decode) and as the naive peer's
decoding (bench.pipeline, ``--peer-decode full``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from lightbox.manifest import Manifest
from lightbox.pixels import decode_frame, to_display
from lightbox.preprocess import prepare


def prepare_full_size(path: Path | str, manifest: Manifest) -> np.ndarray:
    """Every pixel decoded and windowed, then area-resized to the model input."""
    ds = pydicom.dcmread(path)
    return prepare(to_display(decode_frame(ds), ds, manifest.preprocessing), manifest)
