"""Pixels to model input on real DICOM: lightbox.pixels (decode, modality LUT, VOI window,
MONOCHROME1) and lightbox.preprocess (resize, padding, normalisation)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut
from pydicom.uid import generate_uid

from lightbox.errors import PixelDecodeError
from lightbox.manifest import InputSpec, Manifest, PreprocessSpec
from lightbox.pixels import decode_frame, read_dataset, to_display
from lightbox.preprocess import prepare, prepare_file
from lightbox.synthetic import STORED_BITS, chest_image, cr_dataset, to_stored

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def manifest(height: int = 64, width: int = 64, channels: int = 1, **spec: object) -> Manifest:
    return Manifest(
        name="test", version="1", architecture="none",
        input=InputSpec(height=height, width=width, channels=channels),
        preprocessing=PreprocessSpec(**spec), labels=["finding"], thresholds={},
    )


def display_of(ds: Dataset, **spec: object) -> np.ndarray:
    return to_display(decode_frame(ds), ds, PreprocessSpec(**spec))


def dicom_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear window, scaled to [0, 1]."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


# --- MONOCHROME1, transfer syntaxes, VOI window --------------------------------------------------


def test_chest_cr_uncompressed_and_jpeg2000_give_identical_display() -> None:
    uncompressed = read_dataset(get_testdata_file("RG1_UNCR.dcm"))
    j2k = read_dataset(get_testdata_file("RG1_J2KR.dcm"))
    assert uncompressed.file_meta.TransferSyntaxUID != j2k.file_meta.TransferSyntaxUID
    assert uncompressed.PhotometricInterpretation == j2k.PhotometricInterpretation == "MONOCHROME1"

    stored = decode_frame(uncompressed)
    assert np.array_equal(stored, decode_frame(j2k))  # reversible JPEG 2000
    shown = display_of(uncompressed)
    assert np.array_equal(shown, display_of(j2k))

    # MONOCHROME1: low stored values are bright. The file's window (15000/30000) is applied as
    # written, then inverted; it is not re-stretched to this image's own min and max.
    center, width = float(uncompressed.WindowCenter), float(uncompressed.WindowWidth)
    expected = 1.0 - dicom_window(stored.astype(np.float64), center, width)
    np.testing.assert_allclose(shown, expected, atol=1e-4)
    assert np.corrcoef(stored[::8, ::8].ravel(), shown[::8, ::8].ravel())[0, 1] < -0.99


@pytest.mark.parametrize("voi", ["percentile", "window"])
def test_monochrome1_and_monochrome2_give_the_same_display(voi: str) -> None:
    image = chest_image(np.random.default_rng(5), size=128, opacity=True)
    top = 2**STORED_BITS - 1
    shown = {}
    for mono1 in (False, True):
        ds = cr_dataset(to_stored(image, mono1), study_uid=generate_uid(),
                        series_uid=generate_uid(), monochrome1=mono1, label=1, patient_id="T")
        if voi == "window":  # a full-range window, mirrored for the inverted encoding
            ds.WindowCenter, ds.WindowWidth = (top / 2, top + 1)
        shown[mono1] = display_of(ds, voi=voi)
        assert shown[mono1].dtype == np.float32
        assert 0.0 <= shown[mono1].min() and shown[mono1].max() <= 1.0
    np.testing.assert_allclose(shown[True], shown[False], atol=2e-3)
    # Dense (bright in the synthetic image) stays bright in both encodings.
    for mono1 in (False, True):
        assert np.corrcoef(image.ravel(), shown[mono1].ravel())[0, 1] > 0.99
    if voi == "window":
        np.testing.assert_allclose(shown[False], image, atol=2e-3)


def test_modality_lut_is_applied_before_the_window() -> None:
    ds = read_dataset(get_testdata_file("CT_small.dcm"))
    assert float(ds.RescaleIntercept) == -1024.0
    stored = decode_frame(ds)
    hounsfield = apply_modality_lut(stored, ds).astype(np.float64)
    np.testing.assert_array_equal(hounsfield, stored.astype(np.float64) - 1024.0)

    ds.WindowCenter, ds.WindowWidth = 40, 400  # a soft-tissue window, in HU
    shown = display_of(ds)
    np.testing.assert_allclose(shown, dicom_window(hounsfield, 40, 400), atol=1e-4)
    # Had the window been applied to stored values, the image would look very different.
    assert np.abs(shown - dicom_window(stored.astype(np.float64), 40, 400)).mean() > 0.2


def test_colour_image_with_window_tags_decodes_to_luminance() -> None:
    """Colour is reduced to luminance; a VOI window (grayscale only) present in the file must
    not break it (pydicom refuses to window RGB)."""
    ds = read_dataset(get_testdata_file("SC_rgb.dcm"))
    plain = display_of(ds)
    ds.WindowCenter, ds.WindowWidth = 128, 256

    windowed = display_of(ds)

    np.testing.assert_array_equal(windowed, plain)
    assert windowed.ndim == 2 and windowed.std() > 0.05


# --- compressed syntaxes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("JPEG-LL.dcm", None),  # JPEG lossless, process 14
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("SC_rgb_rle.dcm", "SC_rgb.dcm"),
        ("JPEG2000.dcm", None),  # JPEG 2000 (lossy)
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ],
)
def test_compressed_files_decode(name: str, reference: str | None, tmp_path: Path) -> None:
    model = manifest()
    tensor = prepare_file(get_testdata_file(name), model)

    assert tensor.shape == (1, 64, 64)
    assert tensor.dtype == np.float32
    assert tensor.std() > 0.1  # an image, not a constant
    # pydicom's own decode is the reference: the same frame, and the same tensor as from an
    # uncompressed copy that pydicom decompressed.
    plain = pydicom.dcmread(get_testdata_file(name))
    if plain.PhotometricInterpretation.startswith("MONOCHROME"):  # colour becomes luminance
        np.testing.assert_array_equal(decode_frame(read_dataset(get_testdata_file(name))),
                                      plain.pixel_array)
    plain.decompress()
    plain.save_as(tmp_path / "decompressed.dcm", enforce_file_format=True)
    np.testing.assert_allclose(tensor, prepare_file(tmp_path / "decompressed.dcm", model),
                               atol=1e-6)
    if reference is not None:  # lossless: the same pixels as the uncompressed original
        compressed = decode_frame(read_dataset(get_testdata_file(name)))
        original = decode_frame(read_dataset(get_testdata_file(reference)))
        np.testing.assert_array_equal(compressed, original)
        np.testing.assert_allclose(tensor, prepare_file(get_testdata_file(reference), model),
                                   atol=1e-6)


# --- undecodable pixels --------------------------------------------------------------------------


def _broken_copy(tmp_path: Path, name: str, change: Callable[[Dataset], None]) -> Path:
    ds = pydicom.dcmread(get_testdata_file(name))
    change(ds)
    path = tmp_path / f"broken-{name}"
    ds.save_as(path, enforce_file_format=True)
    return path


def _garbage_codestream(ds: Dataset) -> None:
    ds.PixelData = encapsulate([bytes(range(256)) * 8])


def _unsupported_syntax(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder here


def _wrong_geometry(ds: Dataset) -> None:
    ds.Rows = ds.Rows * 4  # native pixel data now far too short for the declared size


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("JPEG2000.dcm", _garbage_codestream),
        ("JPEG-LL.dcm", _garbage_codestream),
        ("JPEG2000.dcm", _unsupported_syntax),
        ("CT_small.dcm", _wrong_geometry),
    ],
)
def test_undecodable_pixels_raise_pixel_decode_error(
    tmp_path: Path, name: str, change: Callable[[Dataset], None]
) -> None:
    path = _broken_copy(tmp_path, name, change)
    with pytest.raises(PixelDecodeError):
        prepare_file(path, manifest())


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan.dcm", "no_meta.dcm", "README.txt"])
def test_files_without_decodable_pixels_raise_pixel_decode_error(name: str) -> None:
    # Cut pixel data, an object without pixels, no file meta, not DICOM at all.
    with pytest.raises(PixelDecodeError):
        prepare_file(get_testdata_file(name), manifest())


def test_unreadable_file_raises_pixel_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 50)
    with pytest.raises(PixelDecodeError):
        prepare_file(path, manifest())


# --- prepare: size, padding, normalisation -------------------------------------------------------


def test_prepare_shape_and_normalisation() -> None:
    model = manifest(64, 64, mean=0.5, std=0.25)
    tensor = prepare(np.full((200, 100), 0.75, np.float32), model)
    assert tensor.shape == (1, 64, 64)
    assert tensor.dtype == np.float32
    np.testing.assert_allclose(tensor, 1.0, atol=1e-6)  # (0.75 - 0.5) / 0.25

    ramp = np.tile(np.linspace(0, 1, 128, dtype=np.float32), (128, 1))
    tensor = prepare(ramp, manifest(64, 64, channels=3, mean=0.2, std=0.5))
    assert tensor.shape == (3, 64, 64)
    assert np.array_equal(tensor[0], tensor[1]) and np.array_equal(tensor[0], tensor[2])
    # Area resize of a horizontal ramp keeps it a ramp; the mean maps to (0.5 - 0.2) / 0.5.
    assert np.all(np.diff(tensor[0, 10]) > 0)
    np.testing.assert_allclose(tensor[0].mean(), (0.5 - 0.2) / 0.5, atol=1e-3)


def test_prepare_keep_aspect_pads_instead_of_stretching() -> None:
    wide = np.ones((32, 64), np.float32)  # half as tall as wide
    padded = prepare(wide, manifest(64, 64, keep_aspect=True, mean=0.5, std=0.25))[0]
    background, image = (0.0 - 0.5) / 0.25, (1.0 - 0.5) / 0.25
    np.testing.assert_allclose(padded[:16], background)
    np.testing.assert_allclose(padded[48:], background)
    np.testing.assert_allclose(padded[16:48], image)

    tall = np.ones((64, 16), np.float32)
    padded = prepare(tall, manifest(64, 64, keep_aspect=True, mean=0.5, std=0.25))[0]
    np.testing.assert_allclose(padded[:, :24], background)
    np.testing.assert_allclose(padded[:, 40:], background)
    np.testing.assert_allclose(padded[:, 24:40], image)

    stretched = prepare(wide, manifest(64, 64, keep_aspect=False, mean=0.5, std=0.25))[0]
    np.testing.assert_allclose(stretched, image)


def test_prepare_file_matches_prepare_on_display() -> None:
    model = manifest(48, 40, keep_aspect=True)
    path = get_testdata_file("MR_small.dcm")
    ds = read_dataset(path)
    expected = prepare(to_display(decode_frame(ds), ds, model.preprocessing), model)
    tensor = prepare_file(path, model)
    assert tensor.shape == (1, 48, 40)
    np.testing.assert_array_equal(tensor, expected)
