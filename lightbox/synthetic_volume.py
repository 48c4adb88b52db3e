"""SYNTHETIC CT phantoms and DICOM series made from them: for training the demo's volume models,
for tests and for the benchmark. Not patient data; everything made here says so
(``SeriesDescription`` "SYNTHETIC ...", ``ImageComments``, ``PatientName`` SYNTHETIC).

A phantom is a body-like ellipse cylinder of soft tissue (~40 HU) in air (-1000 HU) with two
lungs (~-850 HU), a spine-like bone cylinder (~700 HU) and ellipsoid "lesions" (~+70 HU above
the tissue around them: a hyperdense focus, as a haemorrhage or enhancing nodule is).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

# The demo's 3-D models (trained on these phantoms): the names the packaged series rule routes to.
VOLUME_MODEL_NAMES = {"segmentation": "ct-lesion", "classification": "ct-lesion-present"}

SYNTHETIC_NOTE = "SYNTHETIC phantom made by Lightbox; not patient data"


@dataclass
class Phantom:
    hu: np.ndarray  # (z, y, x) float32 HU
    mask: np.ndarray  # (z, y, x) uint8, 1 inside a lesion
    lesions: list[tuple[tuple[float, float, float], tuple[float, float, float]]]  # centre, radii (voxels)


def make_phantom(shape: Sequence[int] = (32, 64, 64), lesions: int = 1, seed: int = 0,
                 noise: float = 10.0, lesion_radius: tuple[float, float] = (2.5, 5.0)) -> Phantom:
    """A body-like phantom of ``shape`` (z, y, x) with ``lesions`` ellipsoids (0 for none)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((y - cy) / (0.42 * ny)) ** 2 + ((x - cx) / (0.46 * nx)) ** 2 <= 1
    hu[body] = 40.0
    for side in (-1, 1):
        lung = ((y - cy * 0.9) / (0.22 * ny)) ** 2 + ((x - cx - side * 0.2 * nx) / (0.13 * nx)) ** 2 <= 1
        hu[lung & body] = -850.0
    spine = ((y - cy - 0.3 * ny) / (0.06 * ny)) ** 2 + ((x - cx) / (0.06 * nx)) ** 2 <= 1
    hu[spine] = 700.0
    mask = np.zeros(shape, dtype=np.uint8)
    placed = []
    soft = (hu == 40.0)
    for _ in range(lesions):
        for _attempt in range(100):
            rz, ry, rx = (min(float(rng.uniform(*lesion_radius)), n / 4) for n in shape)
            radii = (rz, ry, rx)
            centre = (float(rng.uniform(radii[0], max(radii[0], nz - radii[0] - 1))),
                      float(rng.uniform(0.25 * ny, 0.75 * ny)),
                      float(rng.uniform(0.25 * nx, 0.75 * nx)))
            inside = (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                      + ((x - centre[2]) / radii[2]) ** 2) <= 1
            if inside.any() and soft[inside].mean() > 0.95 and not mask[inside].any():
                hu[inside] += 70.0
                mask[inside] = 1
                placed.append((centre, radii))
                break
    hu += rng.normal(0.0, noise, size=shape).astype(np.float32)
    np.clip(hu, -1024.0, 3071.0, out=hu)  # a 12-bit CT's range
    return Phantom(hu=hu, mask=mask, lesions=placed)


def write_series(hu: np.ndarray, out_dir: Path, spacing: Sequence[float] = (1.0, 1.0, 2.5),
                 origin: Sequence[float] = (-100.0, -100.0, 50.0),
                 orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
                 shuffle_seed: int | None = None, study_uid: str | None = None,
                 template: str = "CT_small.dcm", slopes: Sequence[float] | None = None,
                 description: str = "SYNTHETIC phantom") -> list[Path]:
    """One single-frame CT instance per slice of ``hu`` (z, y, x), written from a real
    pydicom-data CT header with new UIDs, geometry and pixels; spacing (x, y, z) mm.

    Files are named and numbered in a shuffled order when ``shuffle_seed`` is given (arrival
    and InstanceNumber then say nothing about position). ``slopes``: a rescale slope per slice
    (intercept -1024), to test per-slice rescale."""
    out_dir.mkdir(parents=True, exist_ok=True)
    template_path = get_testdata_file(template)
    if not isinstance(template_path, str):
        raise FileNotFoundError(f"pydicom-data has no test file {template!r}")
    base = pydicom.dcmread(template_path)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, column)
    order = list(range(hu.shape[0]))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    paths = []
    for number, k in enumerate(order, start=1):
        ds = _slice_dataset(base, hu[k], study_uid, series_uid, frame_uid,
                            position=np.asarray(origin, float) + normal * spacing[2] * k,
                            orientation=orientation, spacing=spacing, number=number,
                            slope=1.0 if slopes is None else float(slopes[k]),
                            description=description)
        path = out_dir / f"{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(base: Dataset, hu: np.ndarray, study_uid: str, series_uid: str,
                   frame_uid: str, position: np.ndarray, orientation: Sequence[float],
                   spacing: Sequence[float], number: int, slope: float,
                   description: str) -> Dataset:
    ds = base.copy()
    ds.file_meta = copy.copy(base.file_meta)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientName = "SYNTHETIC"
    ds.PatientID = "SYNTHETIC"
    ds.PatientBirthDate = ""
    ds.AccessionNumber = ""
    ds.SeriesDescription = description
    ds.ImageComments = SYNTHETIC_NOTE
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]
    ds.SliceThickness = f"{spacing[2]:g}"
    ds.SliceLocation = f"{position[2]:.4f}"
    ds.Rows, ds.Columns = hu.shape
    intercept = -1024.0
    stored = np.round((hu - intercept) / slope)
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in ds:
            del ds[keyword]
    ds.PixelData = np.clip(stored, 0, 65535).astype("<u2").tobytes()
    return ds


def phantom_slice(size: int, z_mm: float, pixel_mm: float,
                  lesions: Sequence[tuple[float, float, float, float]] = ()) -> np.ndarray:
    """One axial cross-section (size × size, HU, float32) of the body-like phantom at slice
    position ``z_mm``, cut through spherical ``lesions`` (z mm, row, column, radius mm): the
    anatomy of :func:`make_phantom`, made a slice at a time so that a series of any length is
    written without ever holding its volume."""
    y, x = np.ogrid[:size, :size]
    c = (size - 1) / 2
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    body = ((y - c) / (0.42 * size)) ** 2 + ((x - c) / (0.46 * size)) ** 2 <= 1
    hu[body] = 40.0
    for side in (-1, 1):
        lung = (((y - c * 0.9) / (0.22 * size)) ** 2
                + ((x - c - side * 0.2 * size) / (0.13 * size)) ** 2 <= 1)
        hu[lung & body] = -850.0
    hu[((y - c - 0.3 * size) / (0.06 * size)) ** 2 + ((x - c) / (0.06 * size)) ** 2 <= 1] = 700.0
    for lz, ly, lx, radius in lesions:
        cut = (radius ** 2 - (z_mm - lz) ** 2) / pixel_mm ** 2  # in-plane radius², pixels²
        if cut > 0:
            hu[((y - ly) ** 2 + (x - lx) ** 2 <= cut) & (hu == 40.0)] += 70.0
    return hu


def write_large_series(folder: Path, slices: int, size: int = 512,
                       spacing: Sequence[float] = (0.7, 0.7, 1.0), seed: int = 0,
                       noise: float = 10.0) -> list[Path]:
    """A SYNTHETIC single-frame CT series of ``slices`` slices of ``size`` × ``size`` (16-bit,
    uncompressed) in ``folder``, written slice by slice (memory: one slice), for the volume
    path's memory benchmark and test. Spacing (x, y, z) mm; three spherical lesions (radius
    6–10 mm) spread along the series; files named and numbered in shuffled order, as arrival
    order says nothing about position. Marked SYNTHETIC like :func:`write_series`."""
    folder.mkdir(parents=True, exist_ok=True)
    template_path = get_testdata_file("CT_small.dcm")
    if not isinstance(template_path, str):
        raise FileNotFoundError("pydicom-data has no test file 'CT_small.dcm'")
    base = pydicom.dcmread(template_path)
    rng = np.random.default_rng(seed)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    lesions = [(slices * spacing[2] * f, size * (0.45 + 0.05 * i), size * 0.45, radius)
               for i, (f, radius) in enumerate(((0.25, 6.0), (0.5, 10.0), (0.75, 8.0)))]
    order = list(range(slices))
    random.Random(seed).shuffle(order)
    origin = np.array([-size * spacing[0] / 2, -size * spacing[1] / 2, 0.0])
    paths = []
    for number, k in enumerate(order, start=1):
        hu = phantom_slice(size, k * spacing[2], spacing[0], lesions)
        hu += rng.normal(0.0, noise, size=hu.shape).astype(np.float32)
        ds = _slice_dataset(base, np.round(hu), study_uid, series_uid, frame_uid,
                            position=origin + np.array([0.0, 0.0, spacing[2] * k]),
                            orientation=(1, 0, 0, 0, 1, 0), spacing=spacing, number=number,
                            slope=1.0, description="SYNTHETIC large phantom series")
        path = folder / f"{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
