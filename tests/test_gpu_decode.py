"""worker.gpu_decode without a GPU: the probe, the setting, the explain line, and the GPU
decoder's routing, per-image fallback and overflow with a stand-in for the GPU (the one kind
of double the project allows: it decodes with OpenJPEG/libjpeg-turbo on the host and runs the
same plan with numpy). The real GPU path is tests/test_gpu_decode_device.py."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from lightbox.errors import ConfigurationError, PixelDecodeError
from lightbox.manifest import InputSpec, Manifest, PreprocessSpec
from lightbox.prepare_plan import Plan, execute
from lightbox.preprocess import prepare_file
from lightbox.settings import Settings, load_settings
from tests.gpu_helpers import htj2k_copy, scores, scoring_model
from worker.decode_pool import InlineDecoder
from worker.gpu_decode import GpuDecoder, make_decoder, probe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

J2K = get_testdata_file("RG1_J2KR.dcm")
J2K_LOSSY = get_testdata_file("RG1_J2KI.dcm")
UNCOMPRESSED = get_testdata_file("RG1_UNCR.dcm")


def manifest(kind: str = "image") -> Manifest:
    return Manifest(name="test", version="1", architecture="none", kind=kind,  # type: ignore[arg-type]
                    input=InputSpec(height=224, width=224, channels=1),
                    preprocessing=PreprocessSpec(), labels=["finding"], thresholds={})


class HostBackend:
    """The GPU stood in for on the host: OpenJPEG / libjpeg-turbo decode, numpy runs the plan.
    ``fail`` makes the n-th decode call raise; ``broken`` makes prepare raise for those calls;
    ``hold`` blocks decode until set."""

    def __init__(self, fail: set[int] | None = None, broken: set[int] | None = None,
                 hold: threading.Event | None = None) -> None:
        self.fail, self.broken, self.hold = fail or set(), broken or set(), hold
        self.decode_calls = 0
        self.prepare_calls = 0

    def decode(self, codestreams: list[bytes]) -> list[Any | None]:
        if self.hold is not None:
            self.hold.wait(60)
        self.decode_calls += 1
        if self.decode_calls in self.fail:
            raise RuntimeError("device lost")
        from openjpeg import decode

        return [decode(c) for c in codestreams]

    def prepare(self, plan: Plan, frames: list[Any]) -> np.ndarray:
        self.prepare_calls += 1
        if self.prepare_calls in self.broken:
            raise MemoryError("out of device memory")
        out: np.ndarray = execute(plan, np.stack(frames), np)
        return out

    def warm_up(self) -> None:
        return None


def fake_modules(nvimgcodec: bool = True, cupy: bool = True, devices: int | None = 1
                 ) -> Any:
    """An importer whose nvImageCodec and CuPy are what the test says (no GPU here)."""
    def importer(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        if name == "nvidia.nvimgcodec" and nvimgcodec:
            module.__version__ = "0.9.0"  # type: ignore[attr-defined]
            return module
        if name == "cupy" and cupy:
            def count() -> int:
                if devices is None:
                    raise RuntimeError("cudaErrorNoDevice")
                return devices
            runtime = types.SimpleNamespace(getDeviceCount=count)
            module.cuda = types.SimpleNamespace(runtime=runtime)  # type: ignore[attr-defined]
            return module
        raise ImportError(name)
    return importer


def test_probe_says_why(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert probe(settings.model_copy(update={"decode_device": "cpu"}), fake_modules()) \
        == (False, "LIGHTBOX_DECODE_DEVICE=cpu")
    ok, why = probe(settings, fake_modules(nvimgcodec=False))
    assert not ok and why.startswith("nvImageCodec not importable")
    ok, why = probe(settings, fake_modules(cupy=False))
    assert not ok and why.startswith("CuPy not importable")
    ok, why = probe(settings, fake_modules(devices=None))
    assert not ok and why.startswith("no CUDA device")
    assert probe(settings, fake_modules(devices=0)) == (False, "no CUDA device")
    ok, why = probe(settings.model_copy(update={"trt_device": 2}), fake_modules(devices=1))
    assert not ok and "device 2 absent" in why
    ok, why = probe(settings, fake_modules(devices=2))
    assert ok and "nvImageCodec 0.9.0" in why and "device 0 of 2" in why


def test_this_node_decodes_on_the_cores(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    """Here (no nvImageCodec, no GPU) the worker gets the decode pool and says why."""
    cpu = InlineDecoder()
    with caplog.at_level(logging.INFO, logger="worker.gpu_decode"):
        decoder = make_decoder(Settings(data_dir=tmp_path), cpu)
    assert decoder is cpu
    assert any(r.getMessage().startswith("decode path: cpu (") for r in caplog.records)


def test_decode_device_setting_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTBOX_DECODE_DEVICE", "gpu")
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert "LIGHTBOX_DECODE_DEVICE" in str(error.value) and "auto, cpu" in str(error.value)
    monkeypatch.setenv("LIGHTBOX_DECODE_DEVICE", "cpu")
    assert load_settings().decode_device == "cpu"


def test_explain_layout_shows_the_decode_path(tmp_path: Path) -> None:
    env = {"LIGHTBOX_DATA_DIR": str(tmp_path), "LIGHTBOX_RUNTIME": "onnxruntime",
           "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "cli.main", "worker", "--explain-layout"]
    auto = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120, check=True)
    line = next(x for x in auto.stdout.splitlines() if x.startswith("decode path: "))
    # Whatever this node lacks first is named (no nvImageCodec here; on a GPU node: gpu).
    assert line.startswith("decode path: cpu (") or line.startswith("decode path: gpu (")
    forced = subprocess.run(run, env={**env, "LIGHTBOX_DECODE_DEVICE": "cpu"},
                            capture_output=True, text=True, timeout=120, check=True)
    assert "decode path: cpu (LIGHTBOX_DECODE_DEVICE=cpu)" in forced.stdout


def test_gpu_path_equals_the_cpu_path_and_routes_the_rest(tmp_path: Path) -> None:
    """JPEG 2000 through the (stand-in) GPU gives the CPU path's tensor and scores;
    uncompressed and non-image models go to the decode processes untouched."""
    backend = HostBackend()
    decoder = GpuDecoder(InlineDecoder(), backend)
    try:
        m = manifest()
        gpu = [decoder.submit(p, m).result(timeout=60) for p in (J2K, J2K_LOSSY)]
        assert decoder.gpu == 2 and backend.prepare_calls == 2
        cpu = [prepare_file(p, m) for p in (J2K, J2K_LOSSY)]
        assert float(np.abs(gpu[0] - cpu[0]).max()) <= 1e-5
        assert float(np.abs(gpu[1] - cpu[1]).max()) < 1e-3
        model = scoring_model(tmp_path / "scoring.onnx")
        assert float(np.abs(scores(model, gpu) - scores(model, cpu)).max()) < 1e-3
        routed = decoder.submit(UNCOMPRESSED, m).result(timeout=60)
        assert decoder.routed == 1 and np.array_equal(routed, prepare_file(UNCOMPRESSED, m))
        tabular = manifest("tabular").model_copy(update={"features": []})
        decoder.submit(J2K, tabular).result(timeout=60)  # straight to the pool
        assert decoder.gpu == 2 and decoder.routed == 1
    finally:
        decoder.close()


def test_a_gpu_failure_falls_back_per_image() -> None:
    """A batch whose decode raises, and one image whose preparation raises: each image is
    done by the CPU path instead, the others stay on the GPU, nothing is lost."""
    hold = threading.Event()
    backend = HostBackend(fail={1}, broken={2}, hold=hold)
    decoder = GpuDecoder(InlineDecoder(), backend, batch=2)
    try:
        m = manifest()
        first = decoder.submit(J2K, m)  # batch 1 (alone: the thread is already waiting)
        futures = [decoder.submit(p, m) for p in (J2K, J2K_LOSSY)]
        hold.set()
        expected = prepare_file(J2K, m)
        assert np.array_equal(first.result(timeout=60), expected)  # CPU path: exact
        results = [f.result(timeout=60) for f in futures]
        assert float(np.abs(results[0] - expected).max()) <= 1e-5
        assert float(np.abs(results[1] - prepare_file(J2K_LOSSY, m)).max()) < 1e-3
        assert backend.decode_calls >= 2
        assert decoder.fallbacks >= 2 and decoder.gpu + decoder.fallbacks == 3
    finally:
        decoder.close()


def test_a_broken_file_fails_as_on_the_cpu_path(tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" * 100)
    decoder = GpuDecoder(InlineDecoder(), HostBackend())
    try:
        with pytest.raises(PixelDecodeError):
            decoder.submit(broken, manifest()).result(timeout=60)
        assert decoder.routed == 1 and decoder.gpu == 0
    finally:
        decoder.close()


def test_overflow_goes_to_the_decode_processes() -> None:
    """Past ``max_queue`` images waiting for the GPU, the next go to the CPU path at once."""
    hold = threading.Event()
    backend = HostBackend(hold=hold)
    decoder = GpuDecoder(InlineDecoder(), backend, max_queue=2, batch=1)
    try:
        m = manifest()
        futures = [decoder.submit(J2K, m) for _ in range(5)]
        assert decoder.overflow == 3
        assert all(f.done() for f in futures[2:])  # the inline "pool" did them already
        hold.set()
        expected = prepare_file(J2K, m)
        for future in futures:
            assert float(np.abs(future.result(timeout=60) - expected).max()) <= 1e-5
        assert decoder.gpu == 2
    finally:
        decoder.close()


def test_frames_of_one_shape_are_prepared_together() -> None:
    backend = HostBackend()
    decoder = GpuDecoder(InlineDecoder(), backend)
    try:
        m = manifest()
        small = get_testdata_file("MR2_J2KR.dcm")  # 1024², quicker to decode than the CR
        futures = [decoder.submit(small, m) for _ in range(8)]
        expected = prepare_file(small, m)
        for future in futures:
            tensor = future.result(timeout=60)
            assert tensor.base is None  # its own array, not a view of the batch
            assert float(np.abs(tensor - expected).max()) <= 1e-5
        assert decoder.gpu == 8 and backend.prepare_calls < 8
    finally:
        decoder.close()


def test_htj2k_takes_the_gpu_path(tmp_path: Path) -> None:
    """HTJ2K (no reduced decode on either path: full decode, then block means)."""
    path = str(htj2k_copy(tmp_path / "htj2k.dcm"))
    decoder = GpuDecoder(InlineDecoder(), HostBackend())
    try:
        m = manifest()
        tensor = decoder.submit(path, m).result(timeout=60)
        assert decoder.gpu == 1
        assert float(np.abs(tensor - prepare_file(path, m)).max()) <= 1e-5
        assert float(np.abs(tensor - prepare_file(UNCOMPRESSED, m)).max()) <= 1e-5
    finally:
        decoder.close()
