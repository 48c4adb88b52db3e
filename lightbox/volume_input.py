"""A volume → a volume model's input, and patch outputs → one map: numpy only, shared by trainer
and worker (the worker has no torch, so MONAI's sliding_window_inference cannot run there; this
follows its recipe: patches on a regular grid with ``overlap``, the last one flush with the
border, each patch's output weighted by a Gaussian centred on it, the sum divided by the weights).

Memory: :class:`Stitcher` holds two float32 arrays the size of the *resampled* volume (sum and
weights), accumulated and divided in place; patches are produced one batch at a time by
:func:`patch_starts`, never all at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from lightbox.manifest import VolumeSpec
from lightbox.volume import Volume, resample


def window(array: np.ndarray, center: float, width: float) -> np.ndarray:
    """Values clipped to the window and mapped to 0..1. A float32 ``array`` is changed in place
    (no second volume-sized array); pass a copy to keep it."""
    out = array if array.dtype == np.float32 else array.astype(np.float32)
    out -= np.float32(center - width / 2.0)
    out *= np.float32(1.0 / width)
    return np.clip(out, 0.0, 1.0, out=out)


def model_grid(volume: Volume, spec: VolumeSpec, release: bool = False) -> Volume:
    """The volume resampled to the model's spacing and orientation, windowed to 0..1
    (``release``: see :func:`lightbox.volume.resample`)."""
    resampled = resample(volume, spacing=spec.spacing, orientation=spec.orientation,
                         release=release)
    resampled.array = window(resampled.array, spec.window_center, spec.window_width)
    return resampled


def crop_or_pad(array: np.ndarray, size: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """Centre crop / pad ``array`` (z, y, x) to ``size`` (fixed-input models)."""
    out = np.full(tuple(size), fill, dtype=np.float32)
    src, dst = [], []
    for have, want in zip(array.shape, size, strict=True):
        if have >= want:
            start = (have - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(0, want))
        else:
            start = (want - have) // 2
            src.append(slice(0, have))
            dst.append(slice(start, start + have))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _starts(length: int, roi: int, overlap: float) -> list[int]:
    if length <= roi:
        return [0]
    step = max(1, int(roi * (1.0 - overlap)))
    starts = list(range(0, length - roi, step))
    starts.append(length - roi)
    return starts


def padded_shape(shape: Sequence[int], roi: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(s, r) for s, r in zip(shape, roi, strict=True))


def patch_starts(shape: Sequence[int], roi: Sequence[int], overlap: float
                 ) -> list[tuple[int, int, int]]:
    """Corners of the patches covering a (z, y, x) volume padded to at least ``roi``."""
    shape = padded_shape(shape, roi)
    z_starts, y_starts, x_starts = (_starts(s, r, overlap)
                                    for s, r in zip(shape, roi, strict=True))
    return list(itertools.product(z_starts, y_starts, x_starts))


def extract(array: np.ndarray, start: Sequence[int], roi: Sequence[int]) -> np.ndarray:
    """One patch, zero-padded where the volume is smaller than the patch."""
    patch = array[tuple(slice(s, s + r) for s, r in zip(start, roi, strict=True))]
    if patch.shape == tuple(roi):
        return np.ascontiguousarray(patch, dtype=np.float32)
    out = np.zeros(tuple(roi), dtype=np.float32)
    out[tuple(slice(0, n) for n in patch.shape)] = patch
    return out


def iter_patches(array: np.ndarray, roi: Sequence[int], overlap: float
                 ) -> Iterator[tuple[tuple[int, int, int], np.ndarray]]:
    for start in patch_starts(array.shape, roi, overlap):
        yield start, extract(array, start, roi)


def gaussian_weights(roi: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's "gaussian" importance map: centre weighted, borders small but never zero."""
    axes = []
    for size in roi:
        sigma = max(size * sigma_scale, 1e-3)
        x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        axes.append(np.exp(-(x ** 2) / (2 * sigma ** 2)))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights /= weights.max()
    weights = np.maximum(weights, max(weights[weights > 0].min(), 1e-3))
    return np.asarray(weights, dtype=np.float32)


class Stitcher:
    """Accumulates weighted patch outputs (channels, z, y, x) into one map over the volume."""

    def __init__(self, shape: Sequence[int], roi: Sequence[int], channels: int,
                 blend: str = "gaussian", sigma_scale: float = 0.125) -> None:
        self.shape = tuple(shape)
        self.roi = tuple(roi)
        full = padded_shape(shape, roi)
        self.sum = np.zeros((channels, *full), dtype=np.float32)
        self.weight = np.zeros(full, dtype=np.float32)
        self.kernel = (gaussian_weights(roi, sigma_scale) if blend == "gaussian"
                       else np.ones(tuple(roi), dtype=np.float32))

    def add(self, start: Sequence[int], output: np.ndarray) -> None:
        """Accumulates in float32, in place: the only temporary is one patch-sized product."""
        region = tuple(slice(s, s + r) for s, r in zip(start, self.roi, strict=True))
        weighted = np.multiply(output, self.kernel, dtype=np.float32)
        self.sum[(slice(None), *region)] += weighted
        self.weight[region] += self.kernel

    def result(self) -> np.ndarray:
        """The blended map, a view of ``sum`` divided in place (the weights are floored in
        place too: no volume-sized temporary)."""
        crop = tuple(slice(0, n) for n in self.shape)
        out = self.sum[(slice(None), *crop)]
        weight = self.weight[crop]
        np.maximum(weight, np.float32(1e-6), out=weight)
        out /= weight
        return out
