"""Decode speed work keeps results: the in-place linear window equals pydicom's windowing, and
the spawned decode pool returns exactly what inline preprocessing does (errors included)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from lightbox.errors import PixelDecodeError
from lightbox.manifest import PreprocessSpec, load_manifest
from lightbox.pixels import (
    _stored_extremes,
    block_mean,
    decode_frame,
    linear_window,
    to_display,
)
from lightbox.preprocess import prepare_file
from tests.peers import require
from worker.decode_pool import DecodePool


def _reference(array: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The straightforward pydicom route: modality LUT, VOI window, scale, invert."""
    values = apply_voi_lut(apply_modality_lut(array, ds).astype(np.float64), ds, index=0)
    ends = apply_voi_lut(apply_modality_lut(_stored_extremes(ds), ds).astype(np.float64), ds,
                         index=0)
    low, high = float(np.min(ends)), float(np.max(ends))
    out = np.clip((values - low) / (high - low), 0, 1)
    return 1 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out


@pytest.mark.parametrize("name,center,width", [
    ("RG1_UNCR.dcm", None, None),  # MONOCHROME1, window in the file
    ("RG1_UNCR.dcm", 12000.0, 5000.0),  # a narrow window: much of the image clipped
    ("CT_small.dcm", 40.0, 400.0),  # signed, rescale slope/intercept
    ("MR_small.dcm", 600.0, 1200.0),
])
def test_linear_window_fast_path_equals_pydicom(name: str, center: float | None,
                                                width: float | None) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    array = decode_frame(ds)
    assert linear_window(ds) is not None
    fast = to_display(array, ds, PreprocessSpec())
    assert fast.dtype == np.float32 and fast.shape == array.shape
    assert np.max(np.abs(fast - _reference(array, ds))) < 1e-5


def test_nonlinear_windows_take_the_general_path() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40.0, 400.0
    ds.VOILUTFunction = "SIGMOID"
    assert linear_window(ds) is None
    stored = decode_frame(ds)
    out = to_display(stored, ds, PreprocessSpec())
    # PS3.3 C.11.2.1.3.1: y = 1 / (1 + exp(-4 (x - c) / w)) (any output range: the display
    # scale maps the sigmoid of the stored extremes to 0 and 1).
    bits = int(ds.BitsStored)
    extremes = (np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1]) if ds.PixelRepresentation
                else np.array([0, 2 ** bits - 1]))

    def sigmoid(raw: np.ndarray) -> np.ndarray:
        x = raw.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        return 1.0 / (1.0 + np.exp(-4.0 * (x - 40.0) / 400.0))

    low, high = sigmoid(extremes)
    expected = (sigmoid(stored) - low) / (high - low)
    assert out.shape == stored.shape
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert float(out.max()) - float(out.min()) > 0.5  # the window shows the image
    ds.VOILUTFunction = "LINEAR"
    ds.WindowWidth = 1.0  # degenerate
    assert linear_window(ds) is None


def test_decode_pool_matches_inline_and_carries_errors(model_bundle: Path,
                                                       tmp_path: Path) -> None:
    from lightbox.synthetic import real_chest_crs

    manifest = load_manifest(model_bundle)
    _, paths = real_chest_crs(tmp_path)
    broken = tmp_path / "broken.dcm"
    data = bytearray(paths[1].read_bytes())
    data[len(data) - 200_000:] = bytes(200_000)  # zero the end of the JPEG 2000 codestream
    broken.write_bytes(bytes(data))
    pool = DecodePool(2)
    try:
        futures = [pool.submit(p, manifest) for p in (*paths, broken, paths[0])]
        for path, future in zip(paths, futures[:2], strict=True):
            np.testing.assert_array_equal(future.result(120), prepare_file(path, manifest))
        with pytest.raises(PixelDecodeError):
            futures[2].result(120)
        assert futures[3].result(120).shape == (1, manifest.input.height, manifest.input.width)
    finally:
        pool.close()


# --- reduced-resolution JPEG 2000 (lightbox/j2k_reduced.py) --------------------------------------


def _codestream(name: str) -> tuple[pydicom.Dataset, bytes]:
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(get_testdata_file(name))
    return ds, next(generate_frames(ds.PixelData, number_of_frames=1))


def _area_average(full: np.ndarray, factor: int) -> np.ndarray:
    """Block means with openjpeg's ceil rounding (edge blocks are partial)."""
    rows, cols = -(-full.shape[0] // factor), -(-full.shape[1] // factor)
    padded = np.full((rows * factor, cols * factor), np.nan)
    padded[: full.shape[0], : full.shape[1]] = full
    return np.nanmean(padded.reshape(rows, factor, cols, factor), axis=(1, 3))


def test_reduced_decoder_at_full_resolution_equals_openjpeg_exactly() -> None:
    import openjpeg

    from lightbox.j2k_reduced import decode_reduced, read_header

    ds, codestream = _codestream("RG1_J2KR.dcm")
    header = read_header(codestream)
    assert header is not None
    assert (header.height, header.width, header.precision, header.levels) == (1955, 1841, 15, 5)
    ours = decode_reduced(codestream, header, 0)
    assert ours is not None  # Pillow's 16-bit scaling undone by the SIZ precision
    np.testing.assert_array_equal(ours, openjpeg.decode(codestream))
    np.testing.assert_array_equal(ours, ds.pixel_array)


def test_reduced_decode_covers_the_model_input_and_matches_an_area_average() -> None:
    from lightbox.j2k_reduced import read_header, reduction_for

    ds, codestream = _codestream("RG1_J2KR.dcm")
    header = read_header(codestream)
    assert header is not None
    assert reduction_for(header, 224, 224) == 3  # 245×231; one more level would be 123×116
    assert reduction_for(header, 2000, 2000) == 0
    assert reduction_for(header, 1, 1) == header.levels  # capped by the decomposition levels
    reduced = decode_frame(ds, (224, 224))
    assert reduced.shape == (245, 231) and reduced.dtype == np.uint16
    reference = _area_average(decode_frame(ds).astype(np.float64), 8)
    assert np.corrcoef(reduced.ravel(), reference.ravel())[0, 1] > 0.99
    assert abs(float(reduced.mean()) - float(reference.mean())) < 0.01 * float(reference.mean())


def test_prepared_jpeg2000_matches_the_uncompressed_original_through_the_window() -> None:
    """Modality LUT, VOI window and MONOCHROME1 inversion are applied to the reduced image the
    same way: the tensor of the JPEG 2000 file is the uncompressed file's, up to the filter."""
    from lightbox.manifest import Manifest

    model = Manifest(name="t", version="1", architecture="none",
                     input={"height": 224, "width": 224}, preprocessing={}, labels=["x"],
                     thresholds={})
    j2k = prepare_file(get_testdata_file("RG1_J2KR.dcm"), model)
    plain = prepare_file(get_testdata_file("RG1_UNCR.dcm"), model)
    assert j2k.shape == plain.shape == (1, 224, 224)
    assert np.corrcoef(j2k.ravel(), plain.ravel())[0, 1] > 0.99
    # mean absolute difference under 2 % of the tensor's spread (wavelet low-pass vs box filter)
    assert float(np.abs(j2k - plain).mean()) < 0.02 * float(plain.max() - plain.min())


def test_reduced_decode_falls_back_to_a_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing JPEG 2000 shortcut decodes in full, then averages blocks like any frame."""
    from PIL import Image

    ds, _ = _codestream("RG1_J2KR.dcm")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("broken data stream")

    monkeypatch.setattr(Image, "open", broken)
    np.testing.assert_array_equal(decode_frame(ds, (224, 224)),
                                  block_mean(ds.pixel_array, 224, 224))


def test_block_mean_averages_whole_blocks_down_to_the_needed_size() -> None:
    rng = np.random.default_rng(3)
    full = rng.integers(0, 2**12, size=(1955, 1841), dtype=np.uint16)
    reduced = block_mean(full, 224, 224)
    assert reduced.shape == (244, 230) and reduced.dtype == np.float32  # 8×8: one more is 122
    reference = full[:1952, :1840].astype(np.float64).reshape(244, 8, 230, 8).mean(axis=(1, 3))
    np.testing.assert_allclose(reduced, reference, rtol=1e-6)
    assert block_mean(full, 1000, 224) is full  # 977 rows after one halving: too few
    assert block_mean(full, 977, 900).shape == (977, 920)


def test_uncompressed_frames_are_block_averaged_and_luts_decode_in_full() -> None:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    np.testing.assert_array_equal(decode_frame(ds, (224, 224)),
                                  block_mean(ds.pixel_array, 224, 224))
    ds.ModalityLUTSequence = [pydicom.Dataset()]  # a table needs the stored integers
    np.testing.assert_array_equal(decode_frame(ds, (224, 224)), ds.pixel_array)


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "JPEG2000.dcm", "US1_J2KR.dcm"])
def test_signed_and_colour_jpeg2000_frames_decode_in_full_before_averaging(name: str) -> None:
    """The wavelet shortcut takes unsigned grayscale only; the others decode in full."""
    ds = pydicom.dcmread(get_testdata_file(name))
    full = decode_frame(ds)
    reduced = decode_frame(ds, (8, 8))
    np.testing.assert_array_equal(reduced, block_mean(full, 8, 8))
    assert reduced.shape[0] < full.shape[0]


# --- uncompressed frames read straight from the file (lightbox/pixels.py) -----------------------


def _with_unused_bits_set(source: str, out: Path) -> Path:
    """A copy whose stored values have every unused high bit set (PS3.5 8.1.1 lets a writer
    leave anything there): a reader that does not clear or sign-extend them reads garbage."""
    ds = pydicom.dcmread(get_testdata_file(source))
    shift = int(ds.BitsAllocated) - int(ds.BitsStored)
    assert shift > 0
    raw = np.frombuffer(ds.PixelData, dtype=np.uint16).copy()
    raw |= np.uint16(((1 << shift) - 1) << int(ds.BitsStored))
    ds.PixelData = raw.tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def _implicit_copy(source: str, out: Path) -> Path:
    ds = pydicom.dcmread(get_testdata_file(source))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(out, implicit_vr=True, little_endian=True)
    return out


@pytest.mark.parametrize("make", [
    lambda tmp: Path(get_testdata_file("RG1_UNCR.dcm")),  # 15 of 16 bits, the real chest CR
    lambda tmp: Path(get_testdata_file("OBXXXX1A.dcm")),  # 8-bit
    lambda tmp: Path(get_testdata_file("emri_small.dcm")),  # multi-frame: the first frame
    lambda tmp: Path(get_testdata_file("mlut_18.dcm")),  # signed, 12 of 16 bits
    lambda tmp: _with_unused_bits_set("RG1_UNCR.dcm", tmp / "high_unsigned.dcm"),
    lambda tmp: _with_unused_bits_set("mlut_18.dcm", tmp / "high_signed.dcm"),
    lambda tmp: _implicit_copy("RG1_UNCR.dcm", tmp / "implicit.dcm"),
], ids=["cr-15bit", "8bit", "multiframe", "signed-12bit", "unused-bits-unsigned",
        "unused-bits-signed", "implicit-vr"])
def test_uncompressed_frames_read_from_the_file_equal_pydicoms_decode(make, tmp_path: Path) -> None:  # noqa: ANN001
    from lightbox.pixels import _read_native_frame, read_dataset

    path = make(tmp_path)
    ds = read_dataset(path)
    direct = _read_native_frame(ds)
    assert direct is not None, "the direct read should have taken this file"
    expected = pydicom.dcmread(path).pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        expected = expected[0]
    assert direct.dtype == expected.dtype
    np.testing.assert_array_equal(direct, expected)
    np.testing.assert_array_equal(decode_frame(read_dataset(path)), expected)


def test_frames_the_direct_read_does_not_take_are_decoded_by_pydicom(tmp_path: Path) -> None:
    """Big endian, colour, a value shorter than its frame, data set already in memory."""
    from lightbox.pixels import _read_native_frame, read_dataset

    for name in ("MR_small_bigendian.dcm", "US1_UNCR.dcm"):
        ds = read_dataset(get_testdata_file(name))
        assert _read_native_frame(ds) is None
        np.testing.assert_array_equal(decode_frame(ds),
                                      _reference_frame(pydicom.dcmread(get_testdata_file(name))))
    in_memory = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    assert _read_native_frame(in_memory) is None
    short = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    short.PixelData = short.PixelData[: len(short.PixelData) // 2]
    short.save_as(tmp_path / "short.dcm", enforce_file_format=True)
    ds = read_dataset(tmp_path / "short.dcm")
    assert _read_native_frame(ds) is None
    with pytest.raises(PixelDecodeError):  # pydicom's verdict, with the file's UID
        decode_frame(ds)


def _reference_frame(ds: pydicom.Dataset) -> np.ndarray:
    array = ds.pixel_array
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        array = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return array


# --- lossless JPEG through libjpeg-turbo (lightbox/pixels.py) ------------------------------------


def _dcmcjpeg(source: str, out: Path, *options: str) -> Path:
    """``source`` re-encoded by dcmtk's dcmcjpeg (as a modality or PACS would send it)."""
    require("dcmcjpeg", "apt-get install dcmtk; .ci/run does")
    subprocess.run(["dcmcjpeg", *options, get_testdata_file(source), str(out)], check=True,
                   capture_output=True, timeout=120)
    return out


@pytest.mark.parametrize("make", [
    lambda tmp: Path(get_testdata_file("JPGLosslessP14SV1_1s_1f_8b.dcm")),
    lambda tmp: _dcmcjpeg("RG1_UNCR.dcm", tmp / "cr-sv1.dcm", "+e1"),
    lambda tmp: _dcmcjpeg("RG1_UNCR.dcm", tmp / "cr-process14.dcm", "+el", "+sv", "6"),
], ids=["8bit-sv1", "chest-cr-15bit-sv1", "chest-cr-process14-sv6"])
def test_lossless_jpeg_through_libjpeg_turbo_equals_pydicoms_decode(make, tmp_path: Path) -> None:  # noqa: ANN001
    from lightbox.pixels import _decode_jpeg_lossless, read_dataset

    path = make(tmp_path)
    fast = _decode_jpeg_lossless(read_dataset(path))
    assert fast is not None, "the libjpeg-turbo path should have taken this file"
    expected = pydicom.dcmread(path).pixel_array
    assert fast.dtype == expected.dtype
    np.testing.assert_array_equal(fast, expected)
    np.testing.assert_array_equal(decode_frame(read_dataset(path)), expected)


def test_lossless_jpeg_the_fast_path_does_not_know_goes_to_pydicom(tmp_path: Path) -> None:
    """Signed and colour frames, and values wider than the data set's Bits Stored."""
    from lightbox.pixels import _decode_jpeg_lossless, read_dataset

    for name in ("JPEG-LL.dcm", "SC_rgb_jpeg_gdcm.dcm"):  # signed CT; RGB
        ds = read_dataset(get_testdata_file(name))
        assert _decode_jpeg_lossless(ds) is None
        np.testing.assert_array_equal(decode_frame(ds),
                                      _reference_frame(pydicom.dcmread(get_testdata_file(name))))
    narrow = pydicom.dcmread(_dcmcjpeg("RG1_UNCR.dcm", tmp_path / "cr.dcm", "+e1"))
    narrow.BitsStored, narrow.HighBit = 10, 9  # the CR's values need 15 bits
    narrow.save_as(tmp_path / "narrow.dcm")
    assert _decode_jpeg_lossless(read_dataset(tmp_path / "narrow.dcm")) is None
