"""lightbox.prepare_plan: the GPU path's preprocessing, run here with numpy as the array module,
against the CPU path (lightbox.preprocess.prepare_file) on the real chest CRs.

The frame handed to the plan is OpenJPEG's full decode (``_decode_full``), which is what
nvImageCodec returns on the GPU node (bit-identical there; tests/test_gpu_decode_device.py
checks it where a GPU is present). Every array operation the plan uses exists in CuPy with the
same semantics, so these tests check the plan's arithmetic; the device test checks CuPy."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import get_frame

from lightbox.errors import PixelDecodeError
from lightbox.j2k_reduced import decode_reduced, read_header
from lightbox.manifest import InputSpec, Manifest, PreprocessSpec
from lightbox.pixels import _decode_full, read_dataset
from lightbox.prepare_plan import _low_band, execute, first_frame, plan_for, resize_weights
from lightbox.preprocess import prepare_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def manifest(height: int = 224, width: int = 224, channels: int = 1,
             **spec: object) -> Manifest:
    return Manifest(name="test", version="1", architecture="none",
                    input=InputSpec(height=height, width=width, channels=channels),
                    preprocessing=PreprocessSpec(**spec), labels=["finding"], thresholds={})


SPECS = [manifest(), manifest(64, 64, 3), manifest(224, 160, keep_aspect=True),
         manifest(100, 90, resize="bilinear"), manifest(512, 512)]


@pytest.mark.parametrize("name,reduce", [("RG1_UNCR.dcm", "block"), ("RG1_J2KR.dcm", "dwt53"),
                                         ("RG3_UNCR.dcm", "block")])
def test_plan_equals_the_cpu_path_on_real_crs(name: str, reduce: str) -> None:
    path = get_testdata_file(name)
    for spec in SPECS:
        ds = read_dataset(path)
        plan = plan_for(ds, spec)
        assert plan is not None and plan.reduce == reduce
        cpu = prepare_file(path, spec)
        gpu = execute(plan, _decode_full(ds), np)
        assert gpu.shape == cpu.shape and gpu.dtype == np.float32
        # Only Pillow's double sums against a float64 matmul differ: a float32 ulp or two.
        assert float(np.abs(gpu - cpu).max()) <= 1e-5, (name, spec.input)


def test_low_band_of_a_full_decode_is_the_reduced_decode() -> None:
    """Reversible JPEG 2000: the forward 5/3 wavelet of the full decode gives exactly the band
    OpenJPEG returns when it stops at that level (the CPU path's reduced decode)."""
    ds = read_dataset(get_testdata_file("RG1_J2KR.dcm"))
    codestream = get_frame(ds.PixelData, 0, number_of_frames=1)
    header = read_header(codestream)
    assert header is not None and header.reversible and header.single_tile
    full = _decode_full(ds)
    plan = plan_for(ds, manifest())
    assert plan is not None
    for levels in (1, 2, 3, 4):
        reduced = decode_reduced(codestream, header, levels)
        assert reduced is not None
        band = _low_band(full, plan.__class__(**{**plan.__dict__, "levels": levels}), np)
        assert band.shape == reduced.shape and np.array_equal(band, reduced), levels


def test_lossy_jpeg2000_within_a_stored_unit() -> None:
    """Irreversible 9/7: the full decode was rounded to integers, so the band is the reduced
    decode's within one stored unit, and the model input within 1e-3."""
    path = get_testdata_file("RG1_J2KI.dcm")
    ds = read_dataset(path)
    codestream = get_frame(ds.PixelData, 0, number_of_frames=1)
    header = read_header(codestream)
    assert header is not None and not header.reversible
    plan = plan_for(ds, manifest())
    assert plan is not None and plan.reduce == "dwt97"
    full = _decode_full(ds)
    reduced = decode_reduced(codestream, header, plan.levels)
    assert reduced is not None
    band = _low_band(full, plan, np)
    assert int(np.abs(band.astype(np.int64) - reduced).max()) <= 1
    assert float(np.abs(execute(plan, full, np) - prepare_file(path, manifest())).max()) < 1e-3


@pytest.mark.parametrize("resample", ["area", "bilinear"])
def test_resize_weights_are_pillows(resample: str) -> None:
    image = np.random.default_rng(0).random((245, 231), dtype=np.float32)
    filters = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR}
    for height, width in ((224, 224), (64, 50), (245, 100), (300, 231)):
        pil = np.asarray(Image.fromarray(image, mode="F").resize((width, height),
                                                                 filters[resample]))
        mine = image.astype(np.float64)
        if width != image.shape[1]:
            mine = (mine @ resize_weights(image.shape[1], width, resample).T).astype(np.float32)
        if height != image.shape[0]:
            mine = resize_weights(image.shape[0], height, resample) @ mine.astype(np.float64)
        assert float(np.abs(mine - pil).max()) <= 1e-6, (height, width)


def test_no_plan_where_the_cpu_path_does_something_else() -> None:
    """Percentile display, non-image models, colour: no plan, the image takes the CPU path."""
    ds = read_dataset(get_testdata_file("RG1_UNCR.dcm"))
    assert plan_for(ds, manifest(voi="percentile")) is None
    tabular = manifest().model_copy(update={"kind": "tabular"})
    assert plan_for(ds, tabular) is None
    colour = read_dataset(get_testdata_file("SC_rgb_jpeg_dcmd.dcm"))
    assert plan_for(colour, manifest()) is None
    no_window = read_dataset(get_testdata_file("RG1_UNCR.dcm"))
    del no_window.WindowCenter
    assert plan_for(no_window, manifest()) is None


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG1_J2KI.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
                                  "emri_small_jpeg_2k_lossless.dcm"])
def test_first_frame_is_pydicoms(name: str) -> None:
    """The fast walk over the items gives pydicom's frame (single- and multi-frame files)."""
    ds = read_dataset(get_testdata_file(name))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    assert first_frame(ds) == get_frame(ds.PixelData, 0, number_of_frames=frames)


def test_a_frame_declaring_another_size_is_refused() -> None:
    """As on the CPU path: the decoder would allocate what the codestream says."""
    ds = read_dataset(get_testdata_file("RG1_J2KR.dcm"))
    ds.Rows = 100
    with pytest.raises(PixelDecodeError, match="refused"):
        plan_for(ds, manifest())


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"])
def test_a_stack_of_frames_prepares_as_each_frame(name: str) -> None:
    """The GPU prepares frames of one shape and plan together: the same tensors."""
    ds = read_dataset(get_testdata_file(name))
    full = _decode_full(ds)
    other = full[::-1].copy()  # a second image of the same shape
    for spec in (manifest(), manifest(64, 64, 3), manifest(224, 160, keep_aspect=True)):
        plan = plan_for(ds, spec)
        assert plan is not None
        stacked = execute(plan, np.stack([full, other]), np)
        assert stacked.shape == (2, *execute(plan, full, np).shape)
        for one, frame in zip(stacked, (full, other), strict=True):
            assert float(np.abs(one - execute(plan, frame, np)).max()) <= 1e-6
