"""CT/MR series → one 3-D volume with its geometry: the one implementation trainer and worker share.

A volume is assembled in two steps so that a worker can decode slices in parallel:

1. :func:`plan_volume` reads headers only (single-frame instances and Enhanced multi-frame
   per-frame functional groups alike), orders every slice by its position along the slice
   normal (ImageOrientationPatient × ImagePositionPatient — never InstanceNumber or arrival
   order) and checks the geometry: one orientation, one pixel spacing, one size, no duplicate
   position, uniform spacing within a tolerance. A failed check raises :class:`VolumeGeometryError`
   whose reason says where ("gap of 5.0 mm at z = 112.5"), never a silently wrong volume.
2. :func:`decode_slice` turns one planned slice into float32 values with that slice's own
   rescale slope/intercept (HU for CT), and :func:`stack` puts the decoded slices into a
   :class:`Volume` that keeps the geometry (origin, spacing, direction: an affine to patient
   LPS coordinates, as DICOM has them).

Resampling to a model's spacing and orientation (:func:`resample`, :func:`resample_like`) uses
SimpleITK, not torch (worker nodes carry no torch). Why SimpleITK: it is ITK's physical-space
image model (origin, spacing, direction in LPS, exactly DICOM's convention), with DICOMOrient
for orientation codes and linear/nearest/B-spline resampling in C++ with multithreading, in one
binary wheel with no further dependencies. nibabel works in RAS and has no resampler of its
own (it needs scipy, and its affines must be flipped back to LPS for SEG); highdicom's volume
support builds volumes from SEG/multi-frame images but does not resample.

``z`` in messages is the position along the slice normal in mm (patient z for axial series).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from lightbox.errors import PixelDecodeError, VolumeGeometryError
from lightbox.pixels import read_dataset

# Two slices closer than this along the normal are at the same position (a duplicate).
DUPLICATE_TOLERANCE_MM = 0.01
# Orientation cosines that differ by less than this are the same orientation.
ORIENTATION_TOLERANCE = 1e-4
# Default uniform-spacing tolerance: a step may differ from the series' spacing by this
# fraction (scanners round positions to 0.01 mm; reconstruction spacing never varies by 10 %).
SPACING_TOLERANCE = 0.1


@dataclass(frozen=True)
class SliceRef:
    """One 2-D slice of a series: an instance (``frame`` None) or one frame (1-based) of an
    Enhanced multi-frame instance, with the geometry and rescale that belong to it."""

    sop_instance_uid: str
    path: str
    frame: int | None
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) in mm, as DICOM orders it
    rows: int
    columns: int
    slope: float = 1.0
    intercept: float = 0.0

    def where(self) -> str:
        return self.sop_instance_uid + (f" frame {self.frame}" if self.frame else "")


@dataclass(frozen=True)
class VolumePlan:
    """Slices in order along the normal (ascending) and the grid they make."""

    slices: tuple[SliceRef, ...]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]  # (x: along a row, y: down a column, z: slice step)
    direction: tuple[float, ...]  # 3×3 row-major; columns are the i, j, k axes in LPS

    @property
    def shape(self) -> tuple[int, int, int]:
        first = self.slices[0]
        return (len(self.slices), first.rows, first.columns)


@dataclass
class Volume:
    """Voxels as ``array[k, j, i]`` (slice, row, column), float32, with the patient geometry."""

    array: np.ndarray
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    sources: tuple[SliceRef, ...] = field(default_factory=tuple)

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix from voxel index (i, j, k, 1) to patient LPS coordinates in mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction).reshape(3, 3) * np.asarray(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, sources: Sequence[SliceRef] = ()) -> Volume:
        return cls(array=sitk.GetArrayFromImage(image), origin=tuple(image.GetOrigin()),
                   spacing=tuple(image.GetSpacing()), direction=tuple(image.GetDirection()),
                   sources=tuple(sources))


def _floats(value: object, count: int, what: str, where: str) -> tuple[float, ...]:
    try:
        if not isinstance(value, Iterable):
            raise TypeError(f"{type(value).__name__} is not a sequence")
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise VolumeGeometryError(f"{where}: {what} is missing or not numeric") from exc
    if len(numbers) != count or not all(np.isfinite(numbers)):
        raise VolumeGeometryError(f"{where}: {what} needs {count} finite numbers")
    return numbers


def _point(value: object, what: str, where: str) -> tuple[float, float, float]:
    x, y, z = _floats(value, 3, what, where)
    return (x, y, z)


def _cosines(value: object, what: str, where: str
             ) -> tuple[float, float, float, float, float, float]:
    rx, ry, rz, cx, cy, cz = _floats(value, 6, what, where)
    return (rx, ry, rz, cx, cy, cz)


def _pair(value: object, what: str, where: str) -> tuple[float, float]:
    row, column = _floats(value, 2, what, where)
    return (row, column)


def _group(ds: Dataset, frame_group: Dataset | None, keyword: str) -> Dataset | None:
    """A functional group macro item from the frame's own group, else the shared group."""
    for source in (frame_group, _first(ds, "SharedFunctionalGroupsSequence")):
        if source is not None and keyword in source and len(source[keyword].value):
            item: Dataset = source[keyword].value[0]
            return item
    return None


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def slices_of(ds: Dataset, path: Path | str) -> list[SliceRef]:
    """The slices one instance contributes: itself, or each frame of an Enhanced instance
    (geometry and rescale from its per-frame functional groups, falling back to the shared)."""
    uid = str(ds.get("SOPInstanceUID", "?"))
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not rows or not columns:
        raise VolumeGeometryError(f"instance {uid}: no Rows/Columns")
    if "PerFrameFunctionalGroupsSequence" not in ds:
        where = f"instance {uid}"
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeGeometryError(f"{where}: multi-frame without per-frame functional "
                                      "groups (no position per frame)")
        return [SliceRef(
            sop_instance_uid=uid, path=str(path), frame=None,
            position=_point(ds.get("ImagePositionPatient"), "ImagePositionPatient", where),
            orientation=_cosines(ds.get("ImageOrientationPatient"),
                                 "ImageOrientationPatient", where),
            pixel_spacing=_pair(ds.get("PixelSpacing"), "PixelSpacing", where),
            rows=rows, columns=columns,
            slope=float(ds.get("RescaleSlope", 1) or 1),
            intercept=float(ds.get("RescaleIntercept", 0) or 0))]
    refs = []
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != frames:
        raise VolumeGeometryError(f"instance {uid}: {len(per_frame)} per-frame groups for "
                                  f"{frames} frames")
    for number, group in enumerate(per_frame, start=1):
        where = f"instance {uid} frame {number}"
        position = _group(ds, group, "PlanePositionSequence")
        orientation = _group(ds, group, "PlaneOrientationSequence")
        measures = _group(ds, group, "PixelMeasuresSequence")
        transform = _group(ds, group, "PixelValueTransformationSequence")
        refs.append(SliceRef(
            sop_instance_uid=uid, path=str(path), frame=number,
            position=_point(position and position.get("ImagePositionPatient"),
                            "ImagePositionPatient", where),
            orientation=_cosines(orientation and orientation.get("ImageOrientationPatient"),
                                 "ImageOrientationPatient", where),
            pixel_spacing=_pair(measures and measures.get("PixelSpacing"),
                                "PixelSpacing", where),
            rows=rows, columns=columns,
            slope=float((transform.get("RescaleSlope", 1) if transform else 1) or 1),
            intercept=float((transform.get("RescaleIntercept", 0) if transform else 0) or 0)))
    return refs


def _normal(orientation: Sequence[float]) -> np.ndarray:
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, column)
    length = float(np.linalg.norm(normal))
    if length < 0.5:
        raise VolumeGeometryError(f"ImageOrientationPatient {tuple(orientation)} is degenerate")
    return normal / length


def plan_volume(slices: Iterable[SliceRef], spacing_tolerance: float = SPACING_TOLERANCE,
                min_slices: int = 2) -> VolumePlan:
    """Order ``slices`` along the normal and check they make one regular grid.

    Raises :class:`VolumeGeometryError` naming the instance or the position where a check fails.
    """
    refs = list(slices)
    if len(refs) < min_slices:
        raise VolumeGeometryError(f"{len(refs)} slice(s); a volume needs at least {min_slices}")
    first = refs[0]
    for ref in refs[1:]:
        if np.max(np.abs(np.subtract(ref.orientation, first.orientation))) > ORIENTATION_TOLERANCE:
            raise VolumeGeometryError(
                f"orientation differs: {ref.where()} has {_fmt(ref.orientation)}, "
                f"{first.where()} has {_fmt(first.orientation)}")
        if np.max(np.abs(np.subtract(ref.pixel_spacing, first.pixel_spacing))) > 1e-3:
            raise VolumeGeometryError(
                f"pixel spacing differs: {ref.where()} has {_fmt(ref.pixel_spacing)} mm, "
                f"{first.where()} has {_fmt(first.pixel_spacing)} mm")
        if (ref.rows, ref.columns) != (first.rows, first.columns):
            raise VolumeGeometryError(
                f"size differs: {ref.where()} is {ref.rows}×{ref.columns}, "
                f"{first.where()} is {first.rows}×{first.columns}")
    normal = _normal(first.orientation)
    z = np.array([float(np.dot(normal, ref.position)) for ref in refs])
    order = np.argsort(z, kind="stable")
    refs = [refs[i] for i in order]
    z = z[order]
    steps = np.diff(z)
    for duplicate in np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM):
        raise VolumeGeometryError(
            f"duplicate position z = {z[duplicate]:.2f}: {refs[duplicate].where()} and "
            f"{refs[duplicate + 1].where()}")
    step = float(np.median(steps))
    for index, value in enumerate(steps):
        if abs(value - step) > spacing_tolerance * step:
            kind = "gap" if value > step else "irregular spacing"
            raise VolumeGeometryError(
                f"{kind} of {value:.1f} mm at z = {z[index + 1]:.1f} (after z = {z[index]:.1f}; "
                f"slice spacing {step:.2f} mm; between {refs[index].where()} and "
                f"{refs[index + 1].where()})")
    # In-plane offsets must stay on the normal's line (a sheared stack is not a grid).
    row, column = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    origin = np.asarray(refs[0].position)
    for index, ref in enumerate(refs):
        offset = np.asarray(ref.position) - origin
        shear = max(abs(float(np.dot(offset, row))), abs(float(np.dot(offset, column))))
        if shear > max(0.5 * min(first.pixel_spacing), spacing_tolerance * step):
            raise VolumeGeometryError(
                f"{ref.where()} at z = {z[index]:.1f} is shifted {shear:.1f} mm in plane "
                "(gantry tilt or mixed stacks)")
    direction = np.stack([row, column, normal], axis=1)
    return VolumePlan(
        slices=tuple(refs), origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        spacing=(float(first.pixel_spacing[1]), float(first.pixel_spacing[0]),
                 float((z[-1] - z[0]) / (len(z) - 1))),
        direction=tuple(float(v) for v in direction.ravel()))


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def plan_files(paths: Iterable[Path | str], spacing_tolerance: float = SPACING_TOLERANCE
               ) -> VolumePlan:
    """Headers of ``paths`` (pixel data deferred, not read) → :func:`plan_volume`."""
    refs: list[SliceRef] = []
    for path in paths:
        refs.extend(slices_of(read_dataset(path), path))
    return plan_volume(refs, spacing_tolerance)


# Frames of one multi-frame file decoded per task: an Enhanced CT/MR series may be a single file
# of hundreds of frames, which must not be decoded (nor sent back from a decode process, nor
# turned into float32) all at once beside the volume they go into.
FRAMES_PER_TASK = 16


def decode_groups(plan: VolumePlan, frames_per_task: int = FRAMES_PER_TASK) -> list[list[int]]:
    """Plan indices grouped into decode tasks: a single-frame file alone, a multi-frame file's
    slices in runs of at most ``frames_per_task`` (each file still read once per run)."""
    by_file: dict[str, list[int]] = {}
    for index, ref in enumerate(plan.slices):
        by_file.setdefault(ref.path, []).append(index)
    step = max(1, frames_per_task)
    return [indices[start:start + step] for indices in by_file.values()
            for start in range(0, len(indices), step)]


def decode_frames(path: Path | str, frames: Sequence[int | None]) -> list[np.ndarray]:
    """Stored values of the given frames of one file (``None``: a single-frame instance). A
    multi-frame file is read frame by frame (pydicom's ``iter_pixels`` on the path), only the
    frames asked for, never its whole pixel array."""
    ds = read_dataset(path)
    uid = str(ds.get("SOPInstanceUID", "?"))
    try:
        if len(frames) == 1 and frames[0] is None:
            from lightbox.pixels import decode_frame
            return [decode_frame(ds)]
        count = int(ds.get("NumberOfFrames", 1) or 1)
        wanted = sorted({(frame or 1) - 1 for frame in frames})
        if wanted[-1] >= count:
            raise PixelDecodeError(f"instance {uid} has no frame {wanted[-1] + 1}")
        from pydicom.pixels import iter_pixels

        decoded = {index: np.array(array, copy=True) for index, array in
                   zip(wanted, iter_pixels(str(path), indices=wanted), strict=True)}
    except PixelDecodeError:
        raise
    except Exception as exc:  # pydicom and its plugins raise many types for broken data
        raise PixelDecodeError(f"cannot decode pixels of instance {uid}: "
                               f"{type(exc).__name__}") from exc
    return [decoded[(frame or 1) - 1] for frame in frames]


def decode_slice(ref: SliceRef) -> np.ndarray:
    """One slice's rescaled values (float32; HU for CT), checked against its planned size."""
    return decode_file_slices([ref])[0]


def decode_file_slices(refs: Sequence[SliceRef]) -> list[np.ndarray]:
    """Rescaled values of slices that all come from one file, the file decoded once."""
    arrays = decode_frames(refs[0].path, [ref.frame for ref in refs])
    out = []
    for ref, array in zip(refs, arrays, strict=True):
        if array.shape != (ref.rows, ref.columns):
            raise PixelDecodeError(f"instance {ref.where()}: pixels are {array.shape}, header "
                                   f"says {(ref.rows, ref.columns)}")
        out.append(array.astype(np.float32) * np.float32(ref.slope) + np.float32(ref.intercept))
    return out


def stack(plan: VolumePlan, slices: Sequence[np.ndarray] | None = None) -> Volume:
    """The volume of ``plan``; ``slices`` are its decoded slices in plan order (decoded here
    by :func:`decode_groups`, when not given). Memory: the float32 volume, filled in place,
    plus one decode task's slices."""
    array = np.empty(plan.shape, dtype=np.float32)
    if slices is None:
        for indices in decode_groups(plan):
            decoded = decode_file_slices([plan.slices[i] for i in indices])
            for index, values in zip(indices, decoded, strict=True):
                array[index] = values
    else:
        for index, values in enumerate(slices):
            array[index] = values
    return Volume(array=array, origin=plan.origin, spacing=plan.spacing,
                  direction=plan.direction, sources=plan.slices)


def load_series(paths: Iterable[Path | str], spacing_tolerance: float = SPACING_TOLERANCE
                ) -> Volume:
    """Plan, check and decode a series in this process (trainer, tests, tools)."""
    return stack(plan_files(paths, spacing_tolerance))


# Source bytes one resampling slab may copy (SimpleITK takes its own copy of each slab): the
# transient memory of resampling, independent of the series' length.
SLAB_BYTES = 32 << 20
# Source slices beyond a slab's own span that its interpolation may read: linear and nearest
# neighbour read the next slice; B-spline's prefilter is recursive over the whole image, and its
# influence decays by 0.268 per slice, so 12 extra slices leave < 1e-6 of it.
_SLAB_MARGIN = {"linear": 1, "nearest": 1, "bspline": 12}


@dataclass(frozen=True)
class _Oriented:
    """A source array seen in another orientation (a numpy view: axes permuted and flipped,
    nothing copied) with the geometry SimpleITK's DICOMOrient would give it."""

    array: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray  # 3×3, columns are the i, j, k axes


def _oriented(volume: Volume, orientation: str | None) -> _Oriented:
    array = volume.array
    origin = np.asarray(volume.origin, dtype=float)
    spacing = np.asarray(volume.spacing, dtype=float)
    direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    current = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(volume.direction)
    if not orientation or orientation.upper() == current:
        return _Oriented(array, origin, spacing, direction)
    # DICOMOrient's own permutation and flips, found on a 1-voxel image of the same direction.
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetDirection(volume.direction)
    orient = sitk.DICOMOrientImageFilter()
    orient.SetDesiredCoordinateOrientation(orientation.upper())
    orient.Execute(probe)
    order = [int(a) for a in orient.GetPermuteOrder()]
    flips = [bool(f) for f in orient.GetFlipAxes()]
    # SimpleITK axis a (x, y, z) is numpy axis 2 - a.
    array = np.transpose(array, [2 - order[2], 2 - order[1], 2 - order[0]])
    spacing, direction = spacing[order], direction[:, order]
    size = np.asarray(array.shape[::-1])
    for axis, flip in enumerate(flips):
        if flip:
            origin = origin + direction[:, axis] * spacing[axis] * (size[axis] - 1)
            direction[:, axis] = -direction[:, axis]
            index: list[slice] = [slice(None)] * 3
            index[2 - axis] = slice(None, None, -1)
            array = array[tuple(index)]
    return _Oriented(array, origin, spacing, direction)


def resample(volume: Volume, spacing: Sequence[float] | None = None,
             orientation: str | None = None, interpolator: str = "linear",
             fill: float | None = None, release: bool = False,
             slab_bytes: int = SLAB_BYTES) -> Volume:
    """``volume`` on a grid of ``spacing`` (x, y, z mm) and ``orientation`` (a DICOM/ITK code
    such as "LPS": the directions the i, j, k axes point to; axes are permuted and flipped, an
    oblique grid stays oblique). ``fill`` defaults to the volume's minimum (air for CT).

    Memory: the output, preallocated, plus one slab. The output is made in slabs along its slice
    axis, each resampled by SimpleITK from only the source slices it needs (a copy of at most
    ``slab_bytes``), so the source is never copied whole (SimpleITK has no zero-copy view of a
    numpy array). Orientation is a numpy view (DICOMOrient's permutation and flips, exact); the
    values equal one SimpleITK resample of the whole volume to within float rounding.

    ``release``: drop ``volume.array`` once resampled (the worker's case); the geometry stays."""
    fill = float(volume.array.min()) if fill is None else fill
    source = _oriented(volume, orientation)
    old_spacing = source.spacing
    new_spacing = old_spacing if spacing is None else np.asarray(spacing, dtype=float)
    old_size = np.asarray(source.array.shape[::-1])
    size = (old_size if spacing is None
            else np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(int))
    if spacing is None or np.allclose(new_spacing, old_spacing, rtol=0, atol=1e-9):
        array = np.ascontiguousarray(source.array, dtype=np.float32)
        size = old_size
    else:
        array = _resample_slabs(source, [int(n) for n in size], new_spacing,
                                _interpolator(interpolator), _SLAB_MARGIN[interpolator], fill,
                                slab_bytes)
    if release:
        volume.array = np.empty((0, 0, 0), np.float32)
    direction = tuple(float(v) for v in source.direction.ravel())
    return Volume(array=array, origin=(float(source.origin[0]), float(source.origin[1]),
                                       float(source.origin[2])),
                  spacing=(float(new_spacing[0]), float(new_spacing[1]), float(new_spacing[2])),
                  direction=direction, sources=volume.sources)


def _resample_slabs(source: _Oriented, size: list[int], spacing: np.ndarray, interpolator: int,
                    margin: int, fill: float, slab_bytes: int) -> np.ndarray:
    """The output grid (``source``'s origin and direction, ``size``, ``spacing``) resampled a
    slab of output slices at a time into one preallocated float32 array."""
    out = np.empty(size[::-1], dtype=np.float32)
    nz = source.array.shape[0]
    ratio = spacing[2] / source.spacing[2]  # source slices per output slice
    slice_bytes = max(1, source.array[0].size * 4)
    source_per_slab = max(1, slab_bytes // slice_bytes - 2 * margin - 1)
    step = max(1, int(source_per_slab / max(ratio, 1e-9)))
    direction = tuple(float(v) for v in source.direction.ravel())
    k_axis = source.direction[:, 2]
    for k0 in range(0, size[2], step):
        k1 = min(size[2], k0 + step)
        first = max(0, int(np.floor(k0 * ratio)) - margin)
        last = min(nz, int(np.ceil((k1 - 1) * ratio)) + margin + 1)
        if first >= last:  # beyond the source: nothing to interpolate
            out[k0:k1] = fill
            continue
        slab = sitk.GetImageFromArray(
            np.ascontiguousarray(source.array[first:last], dtype=np.float32))
        slab.SetOrigin([float(v) for v in source.origin + k_axis * source.spacing[2] * first])
        slab.SetSpacing([float(v) for v in source.spacing])
        slab.SetDirection(direction)
        resampled = sitk.Resample(
            slab, [size[0], size[1], k1 - k0], sitk.Transform(), interpolator,
            [float(v) for v in source.origin + k_axis * spacing[2] * k0],
            [float(v) for v in spacing], direction, fill, sitk.sitkFloat32)
        out[k0:k1] = sitk.GetArrayViewFromImage(resampled)
        del slab, resampled
    return out


def resample_like(array: np.ndarray, geometry: Volume, reference: Volume,
                  interpolator: str = "linear", fill: float = 0.0) -> np.ndarray:
    """``array`` laid on ``geometry``'s grid, resampled onto ``reference``'s grid (e.g. a
    model's probability map back onto the source series, for findings and the SEG)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing)
    image.SetDirection(geometry.direction)
    grid = sitk.Image([int(n) for n in reference.array.shape[::-1]], sitk.sitkUInt8)
    grid.SetOrigin(reference.origin)
    grid.SetSpacing(reference.spacing)
    grid.SetDirection(reference.direction)
    out = sitk.Resample(image, grid, sitk.Transform(),
                        _interpolator(interpolator), float(fill), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _interpolator(name: str) -> int:
    try:
        return int({"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor,
                    "bspline": sitk.sitkBSpline}[name])
    except KeyError:
        raise ValueError(f"unknown interpolator {name!r}: linear, nearest or bspline") from None
