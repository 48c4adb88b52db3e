"""Manifest-driven preprocessing: the one implementation used by the trainer and the worker.

``prepare(display_image, manifest)`` turns a [0, 1] display image (from :mod:`lightbox.pixels`)
into the model's input tensor (C, H, W) float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lightbox.manifest import Manifest, PreprocessSpec
from lightbox.pixels import decode_frame, read_dataset, to_display

# Bumped whenever prepare_file's output changes for the same file and manifest, so caches of
# prepared arrays (the trainer's) can key on it. 2: JPEG 2000 decoded at reduced resolution;
# 3: other frames block-averaged before the window (lightbox.pixels.block_mean).
PREPARE_VERSION = 3

_FILTERS = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR}


def resize(image: np.ndarray, height: int, width: int, spec: PreprocessSpec) -> np.ndarray:
    """Resize a float image; with ``keep_aspect`` pad (centered, zeros) instead of stretching."""
    if spec.keep_aspect:
        scale = min(height / image.shape[0], width / image.shape[1])
        inner = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    else:
        inner = (height, width)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    resized = np.asarray(pil.resize((inner[1], inner[0]), _FILTERS[spec.resize]), np.float32)
    if inner == (height, width):
        return resized
    out = np.zeros((height, width), np.float32)
    top, left = (height - inner[0]) // 2, (width - inner[1]) // 2
    out[top : top + inner[0], left : left + inner[1]] = resized
    return out


def prepare(display: np.ndarray, manifest: Manifest) -> np.ndarray:
    spec, inp = manifest.preprocessing, manifest.input
    image = resize(display, inp.height, inp.width, spec)
    image = (image - spec.mean) / spec.std
    return np.repeat(image[None, :, :], inp.channels, axis=0).astype(np.float32, copy=False)


def prepare_file(path: Path | str, manifest: Manifest) -> np.ndarray:
    """Read, decode, convert and prepare one DICOM file for ``manifest``'s model (for a
    metadata model: its header values, encoded as trained; no pixels are decoded)."""
    if manifest.kind == "tabular":
        from lightbox.tabular import prepare_header_file

        return prepare_header_file(path, manifest)
    ds = read_dataset(path)
    # Only as many pixels as the model input needs (JPEG 2000 resolution levels, or block
    # means of other frames): the trainer and the worker both come through here, so both see
    # exactly the same tensors.
    shape = (manifest.input.height, manifest.input.width)
    return prepare(to_display(decode_frame(ds, shape), ds, manifest.preprocessing), manifest)
