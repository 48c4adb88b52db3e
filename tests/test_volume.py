"""Volume assembly (lightbox/volume.py) on real pydicom / pydicom-data CT and MR objects rewritten
into series: order along the normal, geometry checks with reasons that say where, per-slice
rescale, Enhanced multi-frame, the affine, SimpleITK resampling, sliding-window stitching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from lightbox.errors import PixelDecodeError, VolumeGeometryError
from lightbox.manifest import VolumeSpec
from lightbox.synthetic_volume import make_phantom, write_series
from lightbox.volume import load_series, plan_files, resample, resample_like
from lightbox.volume_input import Stitcher, crop_or_pad, iter_patches, model_grid, patch_starts

SHAPE = (12, 24, 20)  # z, y, x: small, not square, so an axis mix-up cannot pass


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return np.round(make_phantom(SHAPE, lesions=1, seed=3).hu)


def test_shuffled_arrival_gives_the_phantom(tmp_path: Path, phantom: np.ndarray) -> None:
    paths = write_series(phantom, tmp_path, spacing=(0.8, 0.7, 2.5), shuffle_seed=7,
                         origin=(-10.0, -20.0, 100.0))
    # Arrival order (file order) and InstanceNumber are both shuffled.
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths]
    assert numbers == sorted(numbers)
    volume = load_series(paths[::-1])
    np.testing.assert_allclose(volume.array, phantom, atol=0.5)
    assert volume.spacing == pytest.approx((0.8, 0.7, 2.5))
    assert volume.origin == pytest.approx((-10.0, -20.0, 100.0))
    # The affine maps voxel (i, j, k) to patient coordinates.
    assert volume.affine @ np.array([3, 5, 4, 1]) == pytest.approx(
        [-10 + 3 * 0.8, -20 + 5 * 0.7, 100 + 4 * 2.5, 1])
    # Each slice keeps its source instance, ascending along the normal.
    z = [float(pydicom.dcmread(s.path, stop_before_pixels=True).ImagePositionPatient[2])
         for s in volume.sources]
    assert z == sorted(z) and len(set(s.sop_instance_uid for s in volume.sources)) == SHAPE[0]


def test_reversed_orientation_is_ordered_by_position_not_instance_number(
        tmp_path: Path, phantom: np.ndarray) -> None:
    # Column cosine flipped (0,-1,0): the normal points to -z, so ascending along the normal is
    # descending patient z; InstanceNumber ascends with patient z here.
    orientation = (1, 0, 0, 0, -1, 0)
    paths = write_series(phantom, tmp_path, orientation=orientation, spacing=(1, 1, 3))
    volume = load_series(paths)
    np.testing.assert_allclose(volume.array, phantom, atol=0.5)
    direction = np.asarray(volume.direction).reshape(3, 3)
    assert direction[:, 2] == pytest.approx([0, 0, -1])
    assert np.linalg.det(direction) == pytest.approx(1.0)


def test_oblique_series_keeps_its_geometry(tmp_path: Path, phantom: np.ndarray) -> None:
    angle = np.deg2rad(25)
    orientation = (1, 0, 0, 0, np.cos(angle), np.sin(angle))
    paths = write_series(phantom, tmp_path, orientation=orientation, spacing=(1, 1, 2),
                         shuffle_seed=1)
    volume = load_series(paths)
    np.testing.assert_allclose(volume.array, phantom, atol=0.5)
    for k in (0, 5, SHAPE[0] - 1):
        ref = volume.sources[k]
        position = pydicom.dcmread(ref.path, stop_before_pixels=True).ImagePositionPatient
        assert (volume.affine @ [0, 0, k, 1])[:3] == pytest.approx(
            [float(v) for v in position], abs=1e-3)
    # Orientation to LPS permutes/flips axes only: the voxel count stays.
    assert resample(volume, orientation="LPS").array.size == volume.array.size


@pytest.mark.parametrize("drop, where", [(5, r"gap of 5\.0 mm at z = 65\.0 \(after z = 60\.0"),
                                         (9, r"gap of 5\.0 mm at z = 75\.0 \(after z = 70\.0")])
def test_gap_fails_saying_where(tmp_path: Path, phantom: np.ndarray, drop: int,
                                where: str) -> None:
    paths = write_series(phantom, tmp_path, spacing=(1, 1, 2.5), origin=(0, 0, 50))
    by_z = sorted(paths, key=lambda p: float(
        pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    by_z[drop].unlink()
    with pytest.raises(VolumeGeometryError, match=where):
        plan_files(p for p in paths if p.exists())


def test_irregular_spacing_fails(tmp_path: Path, phantom: np.ndarray) -> None:
    paths = write_series(phantom, tmp_path, spacing=(1, 1, 2.0), origin=(0, 0, 0))
    ds = pydicom.dcmread(paths[6])
    ds.ImagePositionPatient = [0, 0, 12.8]  # 10.0 → 12.8 → 14.0
    ds.save_as(paths[6])
    with pytest.raises(VolumeGeometryError, match=r"gap of 2\.8 mm at z = 12\.8"):
        plan_files(paths)
    # A tolerance wide enough accepts it; the default never does.
    assert plan_files(paths, spacing_tolerance=0.5).shape[0] == SHAPE[0]


def test_duplicate_position_fails_naming_both_instances(tmp_path: Path,
                                                         phantom: np.ndarray) -> None:
    paths = write_series(phantom, tmp_path)
    copy = pydicom.dcmread(paths[3])
    copy.SOPInstanceUID = generate_uid()
    copy.save_as(tmp_path / "dup.dcm")
    with pytest.raises(VolumeGeometryError, match="duplicate position") as info:
        plan_files([*paths, tmp_path / "dup.dcm"])
    assert copy.SOPInstanceUID in str(info.value)


def test_mixed_sizes_fail(tmp_path: Path, phantom: np.ndarray) -> None:
    paths = write_series(phantom, tmp_path)
    # A real MR slice (64×64) placed into the CT series' stack.
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr.SeriesInstanceUID = pydicom.dcmread(paths[0]).SeriesInstanceUID
    mr.ImagePositionPatient = [-100, -100, 50 + 2.5 * SHAPE[0]]
    mr.PixelSpacing = [1, 1]
    mr.save_as(tmp_path / "mr.dcm")
    with pytest.raises(VolumeGeometryError, match=f"size differs: {mr.SOPInstanceUID} is 64×64"):
        plan_files([*paths, tmp_path / "mr.dcm"])


def test_mixed_orientation_and_spacing_fail(tmp_path: Path, phantom: np.ndarray) -> None:
    paths = write_series(phantom, tmp_path)
    ds = pydicom.dcmread(paths[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(paths[2])
    with pytest.raises(VolumeGeometryError, match=f"orientation differs: {ds.SOPInstanceUID}"):
        plan_files(paths)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.save_as(paths[2])
    with pytest.raises(VolumeGeometryError, match="pixel spacing differs"):
        plan_files(paths)


def test_per_slice_rescale_gives_hu(tmp_path: Path, phantom: np.ndarray) -> None:
    slopes = [1.0 if k % 2 else 0.5 for k in range(SHAPE[0])]
    paths = write_series(phantom, tmp_path, slopes=slopes, shuffle_seed=2)
    volume = load_series(paths)
    np.testing.assert_allclose(volume.array, phantom, atol=0.5)


def test_real_ct_slice_in_hu(tmp_path: Path) -> None:
    """pydicom-data's 512² CT slice, its positions rewritten into a 4-slice series."""
    source = pydicom.dcmread(get_testdata_file("693_UNCR.dcm"))
    series = generate_uid()
    z0 = float(source.ImagePositionPatient[2])
    paths = []
    for k in (2, 0, 3, 1):
        ds = source.copy()
        ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), series
        ds.ImagePositionPatient = [*source.ImagePositionPatient[:2], z0 + 5.0 * k]
        ds.InstanceNumber = 4 - k
        paths.append(tmp_path / f"{k}.dcm")
        ds.save_as(paths[-1])
    volume = load_series(paths)
    assert volume.array.shape == (4, 512, 512)
    expected = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    np.testing.assert_allclose(volume.array[1], expected)
    assert volume.array.min() <= -900  # air outside the body, in HU
    assert volume.spacing[2] == pytest.approx(5.0)


def test_enhanced_ct_multiframe(tmp_path: Path) -> None:
    """eCT_Supplemental (Enhanced CT, 2 frames 10 mm apart, per-frame positions, shared
    orientation, spacing and rescale): one instance alone, then two instances interleaved."""
    path = Path(get_testdata_file("eCT_Supplemental.dcm"))
    source = pydicom.dcmread(path)
    volume = load_series([path])
    assert volume.array.shape == (2, 512, 512)
    assert volume.spacing[2] == pytest.approx(10.0)
    transform = source.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    expected = source.pixel_array * float(transform.RescaleSlope) + float(
        transform.RescaleIntercept)
    # Row cosine (-1, 0, 0), column (0, 1, 0): the normal is -z, so frame 2 (z = -149) comes
    # first along it.
    assert np.asarray(volume.direction).reshape(3, 3)[:, 2] == pytest.approx([0, 0, -1])
    np.testing.assert_allclose(volume.array, expected[::-1])
    # A second instance shifted 5 mm: frames of both make one 4-slice volume, 5 mm apart.
    shifted = source.copy()
    shifted.SOPInstanceUID = generate_uid()
    for group in shifted.PerFrameFunctionalGroupsSequence:
        position = group.PlanePositionSequence[0].ImagePositionPatient
        group.PlanePositionSequence[0].ImagePositionPatient = [*position[:2],
                                                               float(position[2]) + 5.0]
    shifted.save_as(tmp_path / "shifted.dcm")
    both = load_series([tmp_path / "shifted.dcm", path])
    assert both.array.shape == (4, 512, 512)
    assert both.spacing[2] == pytest.approx(5.0)
    assert [(s.sop_instance_uid == shifted.SOPInstanceUID, s.frame) for s in both.sources] == [
        (True, 2), (False, 2), (True, 1), (False, 1)]


def test_enhanced_mr_without_positions_fails_with_reason() -> None:
    path = Path(get_testdata_file("emri_small.dcm"))
    with pytest.raises(VolumeGeometryError, match="multi-frame without per-frame"):
        plan_files([path])


def test_corrupt_slice_names_the_instance(tmp_path: Path, phantom: np.ndarray) -> None:
    paths = write_series(phantom, tmp_path)
    ds = pydicom.dcmread(paths[4])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(paths[4])
    plan = plan_files(paths)  # headers are fine
    with pytest.raises(PixelDecodeError, match=ds.SOPInstanceUID):
        load_series(paths)
    assert plan.shape == SHAPE


def test_resample_keeps_physical_space(tmp_path: Path) -> None:
    phantom = make_phantom((16, 32, 32), lesions=1, seed=5, noise=0.0)
    paths = write_series(np.round(phantom.hu), tmp_path, spacing=(1.0, 1.0, 3.0), shuffle_seed=4)
    volume = load_series(paths)
    fine = resample(volume, spacing=(2.0, 2.0, 1.5))
    assert fine.array.shape == (32, 16, 16)
    assert fine.origin == pytest.approx(volume.origin)
    # Lesion voxels (+70 HU over soft tissue) survive resampling at about their volume.
    lesion_ml = phantom.mask.sum() * volume.voxel_volume_ml()
    back = resample_like(fine.array, fine, volume)
    assert back.shape == volume.array.shape
    assert ((back > 75) & (back < 200)).sum() * volume.voxel_volume_ml() == pytest.approx(
        lesion_ml, rel=0.35)


def test_sliding_window_stitches_back_the_input(tmp_path: Path, phantom: np.ndarray) -> None:
    spec = VolumeSpec(spacing=(1.5, 1.5, 2.5), window_center=40, window_width=400,
                      roi_size=(8, 16, 16), overlap=0.5)
    paths = write_series(phantom, tmp_path)
    grid = model_grid(load_series(paths), spec)
    assert 0.0 <= grid.array.min() and grid.array.max() <= 1.0
    stitcher = Stitcher(grid.array.shape, spec.roi_size, channels=1)
    count = 0
    for start, patch in iter_patches(grid.array, spec.roi_size, spec.overlap):
        stitcher.add(start, patch[np.newaxis])  # an identity "model"
        count += 1
    assert count == len(patch_starts(grid.array.shape, spec.roi_size, spec.overlap)) > 1
    np.testing.assert_allclose(stitcher.result()[0], grid.array, atol=1e-5)
    assert crop_or_pad(grid.array, (4, 40, 8)).shape == (4, 40, 8)


def test_manifest_volume_block_is_optional(tmp_path: Path) -> None:
    """2-D bundles (no ``volume``) stay valid; a volume block round-trips."""
    import json

    from lightbox.manifest import InputSpec, Manifest, PreprocessSpec

    plain = Manifest(name="chest", version="1", architecture="seed_cnn",
                     input=InputSpec(height=64, width=64), preprocessing=PreprocessSpec(),
                     labels=["pneumonia"], thresholds={"pneumonia": 0.5})
    data = json.loads(plain.model_dump_json())
    del data["volume"]
    assert Manifest.model_validate(data).volume is None
    spec = VolumeSpec(spacing=(1, 1, 2.5), window_center=40, window_width=400,
                      roi_size=(16, 32, 32))
    loaded = Manifest.model_validate_json(
        plain.model_copy(update={"volume": spec}).model_dump_json())
    assert loaded.volume == spec and loaded.volume.mode == "sliding_window"


def test_measure_drops_speckle_below_min_volume() -> None:
    from lightbox.volume import Volume
    from worker.volume_job import measure

    mask = np.zeros((10, 20, 20), np.uint8)
    mask[2:6, 5:10, 5:10] = 1  # 100 voxels of 2 mm³ = 0.2 mL
    mask[8, 15, 15] = 1  # one speckle voxel
    geometry = Volume(array=mask, origin=(0, 0, 0), spacing=(1.0, 1.0, 2.0),
                      direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert measure(mask.copy(), geometry).count == 2
    kept = mask.copy()
    lesions = measure(kept, geometry, min_lesion_ml=0.01)
    assert lesions.count == 1 and lesions.volume_ml == pytest.approx(0.2)
    assert kept.sum() == 100 and kept[8, 15, 15] == 0
    assert lesions.centroid == pytest.approx((7.0, 7.0, 7.0))
