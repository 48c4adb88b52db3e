"""The manifest's preprocessing as a plan of array steps, run by any numpy-like array module.

Why: on a GPU node the decoded frame is already in GPU memory (nvImageCodec,
:mod:`worker.gpu_decode`); copying 7 MB back to run :func:`lightbox.preprocess.prepare_file`
on a core would put the cores back in the way. This module says the same steps as plain array
operations (``astype``, slicing, shifts, ``clip``, ``matmul``, ``repeat``) that numpy and
CuPy both provide, so :func:`execute` runs them with ``xp=cupy`` on the GPU and with
``xp=numpy`` in the tests, which compare it with the CPU path on the real chest CRs.

The CPU path is not routed through here: :mod:`lightbox.preprocess` stays the one
implementation the trainer and the worker use, bit for bit as before. A plan is the same
computation in another form, and only for the cases it covers exactly; :func:`plan_for`
returns ``None`` for everything else and that image takes the CPU path. The steps:

1. **Reduce**, as :func:`lightbox.pixels.decode_frame` does for the model's input size:
   - JPEG 2000 that the CPU path decodes at a reduced wavelet level ``r``: the GPU decodes in
     full (nvImageCodec has no resolution-level decode), then :func:`_low_band` runs ``r``
     levels of the codestream's *forward* wavelet on it and keeps the low-pass band, which is
     what the reduced decode returns. For the reversible 5/3 wavelet (lossless, e.g.
     RG1_J2KR) the integer lifting is exactly invertible, so the band is *equal* to the CPU
     path's (tested on the real CR). For the irreversible 9/7 wavelet (lossy) the full decode
     was rounded to integers before the forward transform, so the band differs by a stored
     unit or two at a few pixels (tested: the model input within 1e-3).
   - any other frame: the same power-of-two block means as :func:`lightbox.pixels.block_mean`
     (float32 sums of integers are exact, so the result is equal).
2. **Window**: the linear modality LUT + VOI window + clip + MONOCHROME1 inversion of
   :func:`lightbox.pixels.to_display`'s fast path, with the same float32 constants. Files
   whose window is not linear (a LUT, SIGMOID, no window: percentiles) have no plan.
3. **Resize**: Pillow's resampling as two small matrices (:func:`resize_weights`: the
   coefficients Pillow's ``precompute_coeffs`` computes for BOX and BILINEAR), applied
   horizontally then vertically in float64 and rounded to float32 after each pass, as Pillow
   does; then the ``keep_aspect`` padding.
4. **Normalise** and **channels**: ``(x - mean) / std`` in float32, repeated per channel.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame

from lightbox.errors import PixelDecodeError
from lightbox.j2k_reduced import JPEG2000_SYNTAXES, read_header, reduction_for
from lightbox.limits import J2K_SYNTAXES, LimitExceeded, check_j2k_frame
from lightbox.manifest import Manifest
from lightbox.pixels import _has_lut, _window_range, linear_window

# The 9/7 lifting constants and gain of ISO 15444-1 Annex F (as openjpeg uses them).
_ALPHA, _BETA = -1.586134342059924, -0.052980118572961
_GAMMA, _DELTA = 0.882911075530934, 0.443506852043971
_K = 1.230174104914001
# Smallest side a wavelet level is computed on (the symmetric extension reaches 6 samples).
_MIN_SIDE = 8

ReduceKind = Literal["none", "block", "dwt53", "dwt97"]


@dataclass(frozen=True)
class Plan:
    """Everything :func:`execute` needs besides the frame's stored values."""

    reduce: ReduceKind
    levels: int  # wavelet levels, or block side 2**levels
    precision: int  # JPEG 2000 bits: DC level shift and clip of the low band
    scale: float  # stored → display: value * scale + offset, then clip to [0, 1]
    offset: float
    invert: bool  # MONOCHROME1
    inner: tuple[int, int]  # resized image (height, width) before padding
    size: tuple[int, int]  # model input (height, width)
    resample: Literal["area", "bilinear"]
    mean: float
    std: float
    channels: int


def first_frame(ds: Dataset) -> bytes:
    """The first frame of encapsulated pixel data (its fragments joined).

    Why not only pydicom's ``get_frame``: it reads each fragment through a ``BytesIO`` (a
    JPEG 2000 chest CR comes in hundreds of fragments), ~3 ms per call where a walk over the
    items is a small fraction of that; on a GPU node the thread that feeds the GPU does this
    for every image. A single-frame data set's fragments after the Basic Offset Table are its
    frame (PS3.5 A.4); anything else, or items that do not parse, go to ``get_frame``."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    data = ds.PixelData
    if frames == 1:
        view, position = memoryview(data), 0
        parts: list[memoryview] = []
        while position + 8 <= len(view):
            group, element, length = struct.unpack_from("<HHI", view, position)
            position += 8
            if (group, element) == (0xFFFE, 0xE0DD):  # sequence delimiter
                break
            if (group, element) != (0xFFFE, 0xE000) or position + length > len(view):
                parts = []
                break
            if position > 8:  # the first item is the Basic Offset Table
                parts.append(view[position : position + length])
            position += length
        if parts:
            return b"".join(parts)
    return bytes(get_frame(data, 0, number_of_frames=frames))


def plan_for(ds: Dataset, manifest: Manifest, frame: bytes | None = None) -> Plan | None:
    """The plan that prepares ``ds``'s first frame exactly as :func:`prepare_file` would, or
    ``None`` when the image must take the CPU path (not a 2-D grayscale image model, a LUT or
    non-linear window, percentiles, colour, a JPEG 2000 stream this module cannot mirror).
    ``frame``: the compressed first frame when the caller has it (:func:`first_frame`).
    Raises :class:`~lightbox.errors.PixelDecodeError` for a frame the CPU path refuses too."""
    spec, inp = manifest.preprocessing, manifest.input
    if manifest.kind != "image" or manifest.volume is not None or spec.voi != "window":
        return None
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or _has_lut(ds) \
            or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    linear = linear_window(ds)
    if linear is None:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if syntax in J2K_SYNTAXES:
        frame = frame if frame is not None else first_frame(ds)
        try:  # as lightbox.pixels._check_declared_size: the decoder allocates what it says
            check_j2k_frame(frame, rows, columns, 1)
        except LimitExceeded as exc:
            raise PixelDecodeError(f"refused {ds.get('SOPInstanceUID', '?')}: {exc}") from exc
    reduced = _reduction(ds, frame, inp.height, inp.width)
    if reduced is None:
        return None
    kind, levels, precision = reduced
    if kind == "none":
        kind, levels = "block", _block_levels(rows, columns, inp.height, inp.width)
        if levels == 0:
            kind = "none"
    height, width = _reduced_shape(kind, levels, rows, columns)
    low, high = _window_range(ds)
    scale = 1.0 / (high - low)
    if spec.keep_aspect:
        ratio = min(inp.height / height, inp.width / width)
        inner = (max(1, round(height * ratio)), max(1, round(width * ratio)))
    else:
        inner = (inp.height, inp.width)
    return Plan(reduce=kind, levels=levels, precision=precision,
                scale=float(np.float32(linear[0] * scale)),
                offset=float(np.float32((linear[1] - low) * scale)),
                invert=photometric == "MONOCHROME1", inner=inner,
                size=(inp.height, inp.width), resample=spec.resize, mean=spec.mean,
                std=spec.std, channels=inp.channels)


def _reduction(ds: Dataset, frame: bytes | None, height: int,
               width: int) -> tuple[ReduceKind, int, int] | None:
    """("dwt53" | "dwt97", r, precision) where the CPU path decodes JPEG 2000 at level r
    (the conditions of :func:`lightbox.pixels._decode_reduced` and
    :func:`lightbox.j2k_reduced.decode_reduced`), ("none", 0, 0) where it decodes in full, or
    None where this module cannot compute that level's band (tiles, image offsets)."""
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if syntax not in JPEG2000_SYNTAXES or int(ds.get("PixelRepresentation", 0) or 0) != 0 \
            or int(ds.get("BitsAllocated", 16) or 16) != 16 or frame is None:
        return "none", 0, 0
    header = read_header(frame)
    if header is None or (header.height, header.width) != (int(ds.Rows), int(ds.Columns)) \
            or header.precision != int(ds.BitsStored) or header.components != 1 \
            or header.signed or not 8 < header.precision <= 16:
        return "none", 0, 0
    levels = reduction_for(header, height, width)
    if levels == 0:
        return "none", 0, 0
    if not header.single_tile or header.x_offset or header.y_offset \
            or (header.height >> (levels - 1)) < _MIN_SIDE \
            or (header.width >> (levels - 1)) < _MIN_SIDE:
        return None
    return ("dwt53" if header.reversible else "dwt97"), levels, header.precision


def _block_levels(rows: int, columns: int, height: int, width: int) -> int:
    """:func:`lightbox.pixels.block_mean`'s ``r``."""
    r = 0
    while rows >> (r + 1) >= height and columns >> (r + 1) >= width:
        r += 1
    return r


def _reduced_shape(kind: ReduceKind, levels: int, rows: int, columns: int) -> tuple[int, int]:
    if kind == "block":
        return rows >> levels, columns >> levels
    if kind in ("dwt53", "dwt97"):
        power = 1 << levels
        return -(-rows // power), -(-columns // power)
    return rows, columns


def execute(plan: Plan, stored: Any, xp: Any = np) -> Any:
    """The model input (C, H, W) float32 from the frame's stored values (H × W), computed
    with the array module ``xp`` (``numpy`` or ``cupy``) on arrays of that module; a stack of
    frames of one shape (N × H × W) gives (N, C, H, W) in one pass (fewer kernel launches on
    the GPU)."""
    image = _reduce(plan, stored, xp)
    image *= xp.float32(plan.scale)
    image += xp.float32(plan.offset)
    xp.clip(image, 0.0, 1.0, out=image)
    if plan.invert:
        xp.subtract(xp.float32(1.0), image, out=image)
    image = _resize(image, plan, xp)
    image = (image - xp.float32(plan.mean)) / xp.float32(plan.std)
    return xp.repeat(image[..., None, :, :], plan.channels, axis=-3).astype(xp.float32,
                                                                           copy=False)


def _reduce(plan: Plan, stored: Any, xp: Any) -> Any:
    if plan.reduce == "block":
        k = 1 << plan.levels
        lead = stored.shape[:-2]
        rows, columns = stored.shape[-2] // k, stored.shape[-1] // k
        blocks = stored[..., : rows * k, : columns * k].reshape(*lead, rows, k, columns * k)
        row_sums = blocks.sum(axis=-2, dtype=xp.float32)
        sums = row_sums.reshape(*lead, rows, columns, k).sum(axis=-1, dtype=xp.float32)
        sums *= xp.float32(1.0 / (k * k))
        return sums
    if plan.reduce in ("dwt53", "dwt97"):
        return _low_band(stored, plan, xp).astype(xp.float32)
    return stored.astype(xp.float32)


def _low_band(stored: Any, plan: Plan, xp: Any) -> Any:
    """``plan.levels`` levels of the forward wavelet, vertical then horizontal at each level
    (ISO 15444-1 F.4.2), keeping the low-pass band; DC level shift and clip as the decoder
    does when it stops at that level."""
    shift = 1 << (plan.precision - 1)
    top = (1 << plan.precision) - 1
    if plan.reduce == "dwt53":
        band = stored.astype(xp.int64) - shift
        for _ in range(plan.levels):
            band = _along(_along(band, -2, _lift53, xp), -1, _lift53, xp)
        return xp.clip(band + shift, 0, top)
    band = stored.astype(xp.float64) - shift
    for _ in range(plan.levels):
        band = _along(_along(band, -2, _lift97, xp), -1, _lift97, xp)
    return xp.clip(xp.rint(band) + shift, 0, top)


def _along(band: Any, axis: int, lift: Any, xp: Any) -> Any:
    """``lift`` (which works along axis 0) applied along ``axis``."""
    return xp.moveaxis(lift(xp.moveaxis(band, axis, 0), xp), 0, axis)


def _extend(x: Any, n: int, xp: Any) -> Any:
    """Whole-sample symmetric extension by ``n`` (even) rows on each side: positions keep
    their parity, so row ``i`` of the result is position ``i - n``."""
    size = x.shape[0]
    index = np.concatenate([np.arange(n, 0, -1), np.arange(size), size - 2 - np.arange(n)])
    return xp.take(x, xp.asarray(index), axis=0)


def _step(e: Any, first: int) -> tuple[Any, Any, Any]:
    """Rows ``first, first + 2, ...`` of ``e`` that have both neighbours, and the neighbours."""
    count = (e.shape[0] - 2 - first) // 2 + 1
    stop = first + 2 * count
    return e[first:stop:2], e[first - 1 : stop - 1 : 2], e[first + 1 : stop + 1 : 2]


def _lift53(x: Any, xp: Any) -> Any:
    """One level of the reversible 5/3 lifting along axis 0; the low band (even positions)."""
    n = 2
    e = _extend(x, n, xp)
    odd, left, right = _step(e, 1)
    odd -= (left + right) >> 1
    even, left, right = _step(e, 2)
    even += (left + right + 2) >> 2
    return e[n : n + x.shape[0] : 2]


def _lift97(x: Any, xp: Any) -> Any:
    """One level of the irreversible 9/7 lifting along axis 0; the low band scaled by 1/K."""
    n = 6
    e = _extend(x, n, xp)
    for coefficient, first in ((_ALPHA, 1), (_BETA, 2), (_GAMMA, 1), (_DELTA, 2)):
        target, left, right = _step(e, first)
        target += coefficient * (left + right)
    return e[n : n + x.shape[0] : 2] / _K


def _filter(name: str, x: np.ndarray) -> np.ndarray:
    if name == "area":  # Pillow's box_filter: 1 on (-0.5, 0.5]
        return ((x > -0.5) & (x <= 0.5)).astype(np.float64)
    triangle: np.ndarray = np.clip(1.0 - np.abs(x), 0.0, None)  # bilinear
    return triangle


@lru_cache(maxsize=64)
def resize_weights(source: int, target: int, name: str) -> np.ndarray:
    """(target, source) float64 weights of Pillow's resampling along one axis (its
    ``precompute_coeffs``: support scaled by the reduction, window bounds rounded as in C,
    each row normalised to sum 1)."""
    scale = source / target
    filterscale = max(scale, 1.0)
    support = (0.5 if name == "area" else 1.0) * filterscale
    weights = np.zeros((target, source), np.float64)
    for out in range(target):
        center = (out + 0.5) * scale
        low = max(int(center - support + 0.5), 0)
        high = min(int(center + support + 0.5), source)
        taps = _filter(name, (np.arange(low, high) - center + 0.5) / filterscale)
        total = taps.sum()
        weights[out, low:high] = taps / total if total != 0 else taps
    weights.flags.writeable = False
    return weights


def _resize(image: Any, plan: Plan, xp: Any) -> Any:
    height, width = plan.inner
    if image.shape[-1] != width:  # Pillow: the horizontal pass first, float32 in between
        weights = xp.asarray(resize_weights(image.shape[-1], width, plan.resample))
        image = (image.astype(xp.float64) @ weights.T).astype(xp.float32)
    if image.shape[-2] != height:
        weights = xp.asarray(resize_weights(image.shape[-2], height, plan.resample))
        image = (weights @ image.astype(xp.float64)).astype(xp.float32)
    if plan.inner == plan.size:
        return image
    out = xp.zeros((*image.shape[:-2], *plan.size), xp.float32)
    top, left = (plan.size[0] - height) // 2, (plan.size[1] - width) // 2
    out[..., top : top + height, left : left + width] = image
    return out
