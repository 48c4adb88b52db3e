"""DICOM pixels to a display-ready float image in [0, 1]: the first half of preprocessing.

Decoding goes through pydicom's pixel handlers (pylibjpeg, openjpeg and RLE plugins), so JPEG,
JPEG 2000 and RLE decode. Then the modality LUT (rescale to physical values), the VOI window
(from the file, or percentiles when the file has none) and MONOCHROME1 inversion, so that
"bright" means "dense" for every model whatever the vendor wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from lightbox.errors import PixelDecodeError
from lightbox.manifest import PreprocessSpec


def read_dataset(path: Path | str) -> Dataset:
    try:
        return pydicom.dcmread(str(path))
    except Exception as exc:  # pydicom raises many types for broken files
        raise PixelDecodeError(f"cannot read {Path(path).name}: {type(exc).__name__}") from exc


def decode_frame(ds: Dataset) -> np.ndarray:
    """The first frame's stored values as a 2-D array (colour is reduced to luminance)."""
    try:
        array = ds.pixel_array
    except Exception as exc:
        uid = ds.get("SOPInstanceUID", "?")
        raise PixelDecodeError(
            f"cannot decode pixels of {uid} ({ds.file_meta.get('TransferSyntaxUID', '?')}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        array = array[0]
    if samples > 1:
        array = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if array.ndim != 2:
        raise PixelDecodeError(f"unsupported pixel array shape {array.shape}")
    return array


def to_display(array: np.ndarray, ds: Dataset, spec: PreprocessSpec) -> np.ndarray:
    """Stored values → float32 in [0, 1], dense = bright."""
    values = apply_modality_lut(array, ds).astype(np.float32, copy=False)
    has_window = "WindowCenter" in ds and "WindowWidth" in ds or "VOILUTSequence" in ds
    if spec.voi == "window" and has_window:
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float32)
        low, high = float(values.min()), float(values.max())
    else:
        low, high = (float(v) for v in np.percentile(
            values[:: max(1, values.shape[0] // 256), :: max(1, values.shape[1] // 256)],
            [spec.percentile_low, spec.percentile_high],
        ))
    if high <= low:
        high = low + 1.0
    out = np.clip((values - low) / (high - low), 0.0, 1.0, dtype=np.float32)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 1.0 - out
    return out
