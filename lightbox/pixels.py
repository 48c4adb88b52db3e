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
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
)

from lightbox.errors import PixelDecodeError
from lightbox.j2k_reduced import JPEG2000_SYNTAXES, decode_reduced, read_header, reduction_for
from lightbox.limits import J2K_SYNTAXES, MIB, LimitExceeded, check_deflated, check_j2k_frame
from lightbox.manifest import PreprocessSpec
from lightbox.settings import get_settings

# Values longer than this stay in the file until used (the pixel data, in practice).
DEFER_ABOVE_BYTES = 64 * 1024
_NATIVE_LITTLE_ENDIAN = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_JPEG_LOSSLESS = frozenset({JPEGLossless, JPEGLosslessSV1})
_PIXEL_DATA = 0x7FE00010


def read_dataset(path: Path | str) -> Dataset:
    """The file's data set, its large values (the pixel data) left in the file until used.

    Why: :func:`decode_frame` reads an uncompressed frame straight from the file into its array
    (:func:`_read_native_frame`), and a compressed frame is read once, on first access, so a
    7 MB CR is not first copied into a Python ``bytes`` object it is then copied out of."""
    try:
        check_deflated(path, int(get_settings().max_inflated_mb * MIB))
        return pydicom.dcmread(str(path), defer_size=DEFER_ABOVE_BYTES)
    except LimitExceeded as exc:
        raise PixelDecodeError(f"refused {Path(path).name}: {exc}") from exc
    except Exception as exc:  # pydicom raises many types for broken files
        raise PixelDecodeError(f"cannot read {Path(path).name}: {type(exc).__name__}") from exc


def decode_frame(ds: Dataset, min_shape: tuple[int, int] | None = None) -> np.ndarray:
    """The first frame's stored values as a 2-D array (colour is reduced to luminance).

    ``min_shape`` (height, width): the caller only needs an image at least that large (it will
    area-resize to it). The frame then comes back at the smallest power-of-two reduction that
    still covers it, as stored values averaged (what an area resize would do first anyway):
    a JPEG 2000 frame by decoding only down to that wavelet resolution level
    (:mod:`lightbox.j2k_reduced`: most of the codestream is never decoded), any
    other frame by averaging blocks of the full decode (:func:`block_mean`). Frames whose
    modality or VOI step is a lookup table are returned in full (a table needs the stored
    integers, not their means)."""
    _check_declared_size(ds)
    if min_shape is not None:
        reduced = _decode_reduced(ds, *min_shape)
        if reduced is not None:
            return reduced
        array = _decode_full(ds)
        return array if _has_lut(ds) else block_mean(array, *min_shape)
    return _decode_full(ds)


def _check_declared_size(ds: Dataset) -> None:
    """A JPEG 2000 frame must declare the data set's size: the decoder allocates for what the
    codestream says (ingest checks this too; this covers files stored before it did)."""
    try:
        if str(ds.file_meta.TransferSyntaxUID) not in J2K_SYNTAXES:
            return
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
        check_j2k_frame(frame, int(ds.Rows), int(ds.Columns),
                        int(ds.get("SamplesPerPixel", 1) or 1))
    except LimitExceeded as exc:
        raise PixelDecodeError(f"refused {ds.get('SOPInstanceUID', '?')}: {exc}") from exc
    except Exception:  # noqa: BLE001 - unreadable frames are reported by the decode itself
        return


def _decode_full(ds: Dataset) -> np.ndarray:
    native = _read_native_frame(ds)
    if native is not None:
        return native
    lossless = _decode_jpeg_lossless(ds)
    if lossless is not None:
        return lossless
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


def _read_native_frame(ds: Dataset) -> np.ndarray | None:
    """The first frame of uncompressed little-endian grayscale pixel data, read from the file
    straight into the array, or ``None`` (anything else: pydicom decodes it).

    Why: pydicom's ``pixel_array`` reads the value into ``bytes``, copies it into an array and
    copies it again to clear the unused high bits (three passes over a CR's pixels); reading the
    frame at the offset pydicom recorded (its value was deferred by :func:`read_dataset`) is
    one read, and the unused bits are cleared in place with pydicom's own shifts (a signed
    value is sign-extended from *Bits Stored*), so the values are identical (tested against
    ``pixel_array``). Only 8- and 16-bit single-sample frames whose value is long enough
    take this path."""
    element = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    filename = getattr(ds, "filename", None)
    if not isinstance(element, RawDataElement) or element.value is not None \
            or not isinstance(filename, str) or element.value_tell is None:
        return None
    try:
        if ds.file_meta.TransferSyntaxUID not in _NATIVE_LITTLE_ENDIAN \
                or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            return None
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.get("PixelRepresentation", 0) or 0)
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return None
    if allocated not in (8, 16) or not 0 < stored <= allocated or signed not in (0, 1) \
            or rows < 1 or columns < 1:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    count = rows * columns
    if element.length < count * dtype.itemsize:
        return None
    try:
        array = np.fromfile(filename, dtype=dtype, count=count, offset=element.value_tell)
    except OSError:
        return None
    if array.size != count:
        return None
    shift = allocated - stored
    if shift:
        np.left_shift(array, shift, out=array)
        np.right_shift(array, shift, out=array)
    return array.reshape(rows, columns)


def _decode_jpeg_lossless(ds: Dataset) -> np.ndarray | None:
    """The first frame of an unsigned grayscale lossless JPEG (process 14, the usual syntax of
    compressed CR and DX) decoded by libjpeg-turbo 3 (imagecodecs), or ``None`` (pydicom
    decodes it).

    Why: pydicom's plugins for it (pylibjpeg-libjpeg, GDCM) are several times slower than
    libjpeg-turbo on a chest CR (figures in the README's performance section). Lossless means
    one right answer, so the values are
    pydicom's exactly (tested); anything this path does not know (signed or colour data,
    a frame whose size or values do not fit the data set, no imagecodecs) goes to pydicom."""
    try:
        if ds.file_meta.TransferSyntaxUID not in _JPEG_LOSSLESS \
                or int(ds.get("SamplesPerPixel", 1) or 1) != 1 \
                or int(ds.get("PixelRepresentation", 0) or 0) != 0:
            return None
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if allocated not in (8, 16) or not 0 < stored <= allocated:
            return None
        from imagecodecs import jpeg8_decode

        array = jpeg8_decode(get_frame(ds.PixelData, 0, number_of_frames=frames))
    except Exception:  # noqa: BLE001 - pydicom's decode below reports real problems
        return None
    dtype = np.dtype(np.uint8 if allocated == 8 else np.uint16)
    if array.shape != (rows, columns) or array.dtype.itemsize > dtype.itemsize \
            or (array.size and int(array.max()) >> stored):
        return None
    return array.astype(dtype, copy=False)


def block_mean(array: np.ndarray, min_height: int, min_width: int) -> np.ndarray:
    """Means of ``k × k`` blocks (float32), ``k = 2**r`` for the largest ``r`` that leaves at
    least ``min_height × min_width``; the array itself when ``r`` is 0.

    Why: the VOI window and the area resize of a 1955×1841 CR are memory passes over 3.6 M
    float pixels (more than the rest of its preparation); averaging 8×8 blocks of the stored
    integers first is one pass over the integers and leaves 244×230. The window
    then comes after this average, exactly as for a JPEG 2000 frame decoded at a reduced
    wavelet level, so the two syntaxes of one image prepare alike. Only whole blocks are
    averaged: up to ``k - 1`` edge rows and columns are dropped (the JPEG 2000 path keeps
    them as partial blocks)."""
    if array.ndim != 2:
        return array
    r = 0
    while array.shape[0] >> (r + 1) >= min_height and array.shape[1] >> (r + 1) >= min_width:
        r += 1
    if r == 0:
        return array
    k = 1 << r
    rows, columns = array.shape[0] // k, array.shape[1] // k
    # float32 sums are exact up to 2**24: 256 uint16 values, far beyond a 224-px model's k.
    row_sums = array[: rows * k].reshape(rows, k, array.shape[1]).sum(axis=1, dtype=np.float32)
    sums = np.add.reduceat(row_sums[:, : columns * k], np.arange(0, columns * k, k), axis=1)
    sums *= np.float32(1.0 / (k * k))
    return sums


def _has_lut(ds: Dataset) -> bool:
    """A modality or VOI step given as a lookup table: it needs the stored integers (no means)
    and is not a linear map."""
    return "ModalityLUTSequence" in ds or "VOILUTSequence" in ds


def _decode_reduced(ds: Dataset, min_height: int, min_width: int) -> np.ndarray | None:
    """The first frame of a grayscale unsigned JPEG 2000 file at reduced resolution, or None
    (not JPEG 2000, nothing to reduce, header disagreeing with the dataset, decoder failure)."""
    try:
        syntax = str(ds.file_meta.TransferSyntaxUID)
        if syntax not in JPEG2000_SYNTAXES or int(ds.get("SamplesPerPixel", 1) or 1) != 1 \
                or int(ds.get("PixelRepresentation", 0) or 0) != 0 \
                or int(ds.get("BitsAllocated", 16) or 16) != 16:
            return None
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        codestream = get_frame(ds.PixelData, 0, number_of_frames=frames)
        header = read_header(codestream)
        if header is None or (header.height, header.width) != (int(ds.Rows), int(ds.Columns)) \
                or header.precision != int(ds.BitsStored):
            return None
        reduce = reduction_for(header, min_height, min_width)
        return decode_reduced(codestream, header, reduce) if reduce > 0 else None
    except Exception:  # noqa: BLE001 - the full decode below reports real problems
        return None


def _stored_extremes(ds: Dataset) -> np.ndarray:
    """The smallest and largest stored values the file's bit depth allows."""
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    return np.array([0, 2**bits - 1], dtype=np.int64)


def _first_float(value: object) -> float:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def linear_window(ds: Dataset) -> tuple[float, float] | None:
    """(a, b) with modality LUT then VOI window == ``a * stored + b`` inside the window, or None
    when either step is not linear (a LUT sequence, a SIGMOID function, a degenerate window).

    Why: pydicom's ``apply_windowing`` makes several float64 passes with boolean masks over the
    whole image (over half the preprocessing time of a 1955×1841 CR). A linear rescale followed
    by a linear window and the clip to the window's output range is one multiply-add and one
    clip, so :func:`to_display` does that in place on one float32 copy. The coefficients are
    measured by running pydicom's own functions on two probe values, so the semantics (output
    range, LINEAR vs LINEAR_EXACT) stay pydicom's."""
    if _has_lut(ds):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT"):
        return None
    try:
        center, width = _first_float(ds.WindowCenter), _first_float(ds.WindowWidth)
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 1:
        return None
    modality = np.asarray(apply_modality_lut(np.array([0.0, 1.0]), ds), dtype=np.float64)
    probe = np.array([center - width / 4, center + width / 4], dtype=np.float64)
    window = np.asarray(apply_voi_lut(probe.copy(), ds, index=0), dtype=np.float64)
    window_slope = (window[1] - window[0]) / (probe[1] - probe[0])
    window_intercept = window[0] - window_slope * probe[0]
    modality_slope, modality_intercept = modality[1] - modality[0], modality[0]
    return (float(modality_slope * window_slope),
            float(modality_intercept * window_slope + window_intercept))


def _window_range(ds: Dataset) -> tuple[float, float]:
    """What the stored extremes map to through the modality LUT and the window."""
    ends = apply_voi_lut(
        apply_modality_lut(_stored_extremes(ds), ds).astype(np.float32), ds, index=0
    )
    low, high = float(np.min(ends)), float(np.max(ends))
    return low, (high if high > low else low + 1.0)


def to_display(array: np.ndarray, ds: Dataset, spec: PreprocessSpec) -> np.ndarray:
    """Stored values → float32 in [0, 1], dense = bright."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    grayscale = photometric in ("MONOCHROME1", "MONOCHROME2")
    linear = linear_window(ds) if spec.voi == "window" and grayscale else None
    if linear is not None:
        # Fast path, same result as below to float32 rounding: the window's clip to its output
        # range is subsumed by the final clip to [low, high] (which lies inside that range).
        low, high = _window_range(ds)
        scale = 1.0 / (high - low)
        out = array.astype(np.float32)  # the one full-size copy
        out *= np.float32(linear[0] * scale)
        out += np.float32((linear[1] - low) * scale)
        np.clip(out, 0.0, 1.0, out=out)
        if photometric == "MONOCHROME1":
            np.subtract(np.float32(1.0), out, out=out)
        return out
    values = apply_modality_lut(array, ds).astype(np.float32, copy=False)
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
    return out  # type: ignore[no-any-return]
