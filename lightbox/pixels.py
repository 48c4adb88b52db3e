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


def _stored_extremes(ds: Dataset) -> np.ndarray:
    """The smallest and largest stored values the file's bit depth allows."""
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    return np.array([0, 2**bits - 1], dtype=np.int64)


def to_display(array: np.ndarray, ds: Dataset, spec: PreprocessSpec) -> np.ndarray:
    """Stored values → float32 in [0, 1], dense = bright."""
    values = apply_modality_lut(array, ds).astype(np.float32, copy=False)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    # A VOI window or LUT is defined for grayscale only (colour was reduced to luminance).
    has_window = photometric in ("MONOCHROME1", "MONOCHROME2") and (
        "WindowCenter" in ds and "WindowWidth" in ds or "VOILUTSequence" in ds
    )
    if spec.voi == "window" and has_window:
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float32)
        # Scale by the window's output range (what the stored extremes map to), not by this
        # image's min/max: the window, not the image content, defines the display.
        ends = apply_voi_lut(
            apply_modality_lut(_stored_extremes(ds), ds).astype(np.float32), ds, index=0
        )
        low, high = float(np.min(ends)), float(np.max(ends))
    else:
        low, high = (float(v) for v in np.percentile(
            values[:: max(1, values.shape[0] // 256), :: max(1, values.shape[1] // 256)],
            [spec.percentile_low, spec.percentile_high],
        ))
    if high <= low:
        high = low + 1.0
    out = np.clip((values - low) / (high - low), 0.0, 1.0, dtype=np.float32)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out
