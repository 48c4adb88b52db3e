"""The volume path's memory bound (issue 17: "the volume itself plus a few hundred MB") and the
slab-wise resampling that keeps it: same values as one SimpleITK resample of the whole volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lightbox.synthetic_volume import write_large_series
from lightbox.volume import Volume, resample

# An oblique direction (rotated about two axes), columns are the i, j, k axes.
_C, _S = np.cos(0.3), np.sin(0.3)
OBLIQUE = (np.array([[1, 0, 0], [0, _C, -_S], [0, _S, _C]])
           @ np.array([[np.cos(0.2), -np.sin(0.2), 0], [np.sin(0.2), np.cos(0.2), 0], [0, 0, 1]]))
DIRECTIONS = {"axial": np.eye(3), "oblique": OBLIQUE,
              "sagittal": np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]])}


def _whole(volume: Volume, spacing: tuple[float, float, float] | None, orientation: str,
           interpolator: int) -> sitk.Image:
    """The reference: DICOMOrient and one Resample of the whole volume (the unchunked way)."""
    image = volume.to_sitk()
    image = sitk.DICOMOrient(image, orientation)
    if spacing is None:
        return image
    size = np.maximum(1, np.round(np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
                                  / np.asarray(spacing)))
    return sitk.Resample(image, [int(n) for n in size], sitk.Transform(), interpolator,
                         image.GetOrigin(), spacing, image.GetDirection(),
                         float(volume.array.min()), sitk.sitkFloat32)


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PIL"])
@pytest.mark.parametrize("spacing", [(1.5, 1.5, 2.0), (0.8, 1.3, 0.7), None])
@pytest.mark.parametrize("interpolator", ["linear", "nearest"])
def test_slabs_equal_one_whole_resample(direction: str, orientation: str,
                                        spacing: tuple[float, float, float] | None,
                                        interpolator: str) -> None:
    rng = np.random.default_rng(3)
    array = rng.normal(size=(37, 23, 29)).astype(np.float32)
    volume = Volume(array=array, origin=(3.0, -5.0, 7.0), spacing=(0.9, 1.1, 1.7),
                    direction=tuple(DIRECTIONS[direction].ravel()))
    reference = _whole(volume, spacing, orientation,
                       sitk.sitkLinear if interpolator == "linear" else sitk.sitkNearestNeighbor)
    # 4 kB slabs: a few source slices each, so slab borders fall everywhere.
    slabbed = resample(volume, spacing=spacing, orientation=orientation,
                       interpolator=interpolator, slab_bytes=4096)
    expected = sitk.GetArrayFromImage(reference)
    assert slabbed.array.shape == expected.shape
    np.testing.assert_allclose(slabbed.array, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(slabbed.origin, reference.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(slabbed.spacing, reference.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(slabbed.direction, reference.GetDirection(), atol=1e-12)


def test_bspline_slabs_stay_close_to_the_whole() -> None:
    """B-spline's prefilter spans the whole image; the slab margin keeps the difference tiny."""
    array = np.random.default_rng(4).normal(size=(40, 16, 16)).astype(np.float32)
    volume = Volume(array=array, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0),
                    direction=tuple(OBLIQUE.ravel()))
    reference = sitk.GetArrayFromImage(_whole(volume, (1.3, 1.3, 1.3), "LPS", sitk.sitkBSpline))
    slabbed = resample(volume, spacing=(1.3, 1.3, 1.3), orientation="LPS",
                       interpolator="bspline", slab_bytes=4096)
    np.testing.assert_allclose(slabbed.array, reference, rtol=0, atol=1e-4)


# Margin over the volume's own bytes for the 200-slice series below. What the path needs beyond
# the source volume is the model-grid volume (1.5 mm: ~29 MiB here), resampling slabs (≤ 2 ×
# lightbox.volume.SLAB_BYTES = 64 MiB) and small buffers: ~70 MiB measured. Any second copy of
# the float32 source (a whole-volume SimpleITK image, a per-slice list beside the stacked array,
# a float64 temporary) adds ≥ 200 MiB and goes over 150, so this fails if one comes back.
MARGIN_MIB = 150


@pytest.mark.slow
def test_peak_memory_is_the_volume_plus_a_bounded_margin(tmp_path: Path) -> None:
    from bench.volume_memory import run_child, write_bundle

    slices = 200
    write_large_series(tmp_path / "series", slices, size=512)
    result = run_child(tmp_path / "series", write_bundle(tmp_path / "bundle"))
    volume_mib = slices * 512 * 512 * 4 / 2**20
    assert result["slices"] == slices
    assert result["lesions_found"] >= 1  # the path ran to the end, not a short cut
    assert result["peak_above_baseline_mib"] >= volume_mib  # the volume itself was there
    assert result["peak_above_baseline_mib"] <= volume_mib + MARGIN_MIB, result


def _enhanced_ct(path: Path, frames: int) -> np.ndarray:
    """An Enhanced CT of ``frames`` frames 2.5 mm apart, built from pydicom-data's
    eCT_Supplemental (each frame its stored values + its number, so frames differ); returns
    the stored frames in file order."""
    import copy

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.sequence import Sequence

    source = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    base = source.pixel_array
    stored = np.stack([base[k % 2] + k for k in range(frames)]).astype(np.uint16)
    groups = []
    for k in range(frames):
        group = copy.deepcopy(source.PerFrameFunctionalGroupsSequence[k % 2])
        group.PlanePositionSequence[0].ImagePositionPatient = [99.5, -301.5, -159.0 + 2.5 * k]
        groups.append(group)
    source.PerFrameFunctionalGroupsSequence = Sequence(groups)
    source.NumberOfFrames = frames
    source.PixelData = stored.tobytes()
    source.save_as(path)
    return stored


class _Recorder:
    """A decode pool stand-in that runs each call here and records its size."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def submit_call(self, fn, refs):  # type: ignore[no-untyped-def]
        from concurrent.futures import Future

        self.sizes.append(len(refs))
        future: Future[object] = Future()
        future.set_result(fn(refs))
        return future


def test_enhanced_frames_are_decoded_in_bounded_runs(tmp_path: Path) -> None:
    """A one-file Enhanced series is decoded FRAMES_PER_TASK frames per task, never its whole
    pixel array at once, with the same values as each frame's stored value × slope + intercept."""
    from lightbox.volume import FRAMES_PER_TASK, load_series, plan_files
    from worker.volume_job import decode_volume

    frames = 2 * FRAMES_PER_TASK + 5
    stored = _enhanced_ct(tmp_path / "enhanced.dcm", frames)
    plan = plan_files([tmp_path / "enhanced.dcm"])
    recorder = _Recorder()
    volume = decode_volume(plan, recorder)
    assert recorder.sizes == [FRAMES_PER_TASK, FRAMES_PER_TASK, 5]
    transform = plan.slices[0]
    expected = stored[[ref.frame - 1 for ref in plan.slices if ref.frame]] * transform.slope \
        + transform.intercept
    np.testing.assert_allclose(volume.array, expected)
    np.testing.assert_array_equal(load_series([tmp_path / "enhanced.dcm"]).array, volume.array)
