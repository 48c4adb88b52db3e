"""The real GPU path (nvImageCodec + CuPy) against the CPU path on the real chest CRs: run on
a GPU node with the gpu-decode extra (bench/README.md, "GPU decoding"); skipped elsewhere with
the probe's reason ("nvImageCodec not importable ...", "no CUDA device ...")."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import get_frame

from lightbox.manifest import InputSpec, Manifest, PreprocessSpec
from lightbox.pixels import _decode_full, read_dataset
from lightbox.prepare_plan import execute, plan_for
from lightbox.preprocess import prepare_file
from lightbox.settings import Settings
from tests.gpu_helpers import htj2k_copy, scores, scoring_model
from worker.decode_pool import InlineDecoder
from worker.gpu_decode import GpuDecoder, NvImageCodecBackend, make_decoder, probe

_GPU, _WHY = probe(Settings(data_dir=Path("lightbox-data")))
pytestmark = [pytest.mark.skipif(not _GPU, reason=_WHY),
              pytest.mark.filterwarnings("ignore::UserWarning")]

LOSSLESS, LOSSY = "RG1_J2KR.dcm", "RG1_J2KI.dcm"


def manifest(height: int = 224, width: int = 224, channels: int = 1,
             **spec: object) -> Manifest:
    return Manifest(name="test", version="1", architecture="none",
                    input=InputSpec(height=height, width=width, channels=channels),
                    preprocessing=PreprocessSpec(**spec), labels=["finding"], thresholds={})


def test_full_decode_is_openjpegs() -> None:
    import cupy

    backend = NvImageCodecBackend(0)
    for name in (LOSSLESS, LOSSY):
        ds = read_dataset(get_testdata_file(name))
        frame = backend.decode([bytes(get_frame(ds.PixelData, 0, number_of_frames=1))])[0]
        assert frame is not None
        decoded = cupy.asnumpy(frame).reshape(int(ds.Rows), int(ds.Columns))
        assert np.array_equal(decoded, _decode_full(ds)), name


def test_cupy_runs_the_plan_as_numpy_does() -> None:
    import cupy

    for name in (LOSSLESS, LOSSY, "RG1_UNCR.dcm"):
        ds = read_dataset(get_testdata_file(name))
        full = _decode_full(ds)
        for spec in (manifest(), manifest(64, 64, 3), manifest(224, 160, keep_aspect=True)):
            plan = plan_for(ds, spec)
            assert plan is not None
            on_gpu = cupy.asnumpy(execute(plan, cupy.asarray(full), cupy))
            assert float(np.abs(on_gpu - execute(plan, full, np)).max()) <= 1e-5, name


def test_scores_equal_the_cpu_path_on_real_crs(tmp_path: Path) -> None:
    decoder = GpuDecoder(InlineDecoder(), NvImageCodecBackend(0))
    try:
        for spec in (manifest(), manifest(64, 64, 3), manifest(224, 160, keep_aspect=True)):
            paths = [get_testdata_file(n) for n in (LOSSLESS, LOSSY)]
            gpu = [decoder.submit(p, spec).result(timeout=120) for p in paths]
            cpu = [prepare_file(p, spec) for p in paths]
            assert float(np.abs(gpu[0] - cpu[0]).max()) <= 1e-5
            assert float(np.abs(gpu[1] - cpu[1]).max()) < 1e-3
            model = scoring_model(tmp_path / f"m{spec.input.channels}.onnx",
                                  channels=spec.input.channels)
            assert float(np.abs(scores(model, gpu) - scores(model, cpu)).max()) < 1e-3
        assert decoder.gpu == 6 and decoder.fallbacks == 0
    finally:
        decoder.close()


def test_htj2k_on_the_gpu_equals_the_cpu_path(tmp_path: Path) -> None:
    pytest.importorskip("imagecodecs", reason="imagecodecs (OpenJPH) encodes the HTJ2K copy")
    path = str(htj2k_copy(tmp_path / "htj2k.dcm"))
    decoder = GpuDecoder(InlineDecoder(), NvImageCodecBackend(0))
    try:
        tensor = decoder.submit(path, manifest()).result(timeout=120)
        assert decoder.gpu == 1 and decoder.fallbacks == 0
        assert float(np.abs(tensor - prepare_file(path, manifest())).max()) <= 1e-5
    finally:
        decoder.close()


def test_the_worker_chooses_the_gpu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="worker.gpu_decode"):
        decoder = make_decoder(Settings(data_dir=tmp_path), InlineDecoder())
    try:
        assert isinstance(decoder, GpuDecoder)
        assert any(r.getMessage().startswith("decode path: gpu (") for r in caplog.records)
    finally:
        decoder.close()
