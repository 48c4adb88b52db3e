"""`lightbox compile`: the ONNX Runtime INT8 model always; TensorRT engines where TensorRT
imports (those tests skip elsewhere, with the import error as the reason)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightbox.manifest import load_manifest
from lightbox.settings import Settings
from lightbox.trt_engine import tensorrt_available
from trainer.compiler import INT8_FILE, compile_bundle
from trainer.export import onnx_scores
from trainer.synthetic_dataset import synthetic_set
from trainer.train import TrainResult, train_seed_cnn

TRT_OK, TRT_REASON = tensorrt_available()


@pytest.fixture(scope="module")
def trained(settings: Settings) -> TrainResult:
    return train_seed_cnn(settings, images=200, epochs=2, seed=3, promote=False)


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LIGHTBOX_DATA_DIR": str(settings.data_path)}
    env.pop("LIGHTBOX_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_compile_builds_int8_and_reports_tensorrt(trained: TrainResult,
                                                  settings: Settings) -> None:
    out = _cli(settings, "compile", str(trained.bundle_dir))
    manifest = load_manifest(trained.bundle_dir, verify=True)  # new files hashed, all verify
    assert INT8_FILE in manifest.files and (trained.bundle_dir / INT8_FILE).is_file()
    int8 = manifest.variants["onnx_int8"]
    assert int8["file"] == INT8_FILE and int8["calibration_images"] == 64
    assert int8["validation_images"] == manifest.training_data["validation_images"]
    assert int8["auroc_fp32"] == pytest.approx(manifest.metrics["auroc"])
    assert abs(float(int8["auroc_change"])) < 0.05  # INT8 keeps the model's accuracy
    assert manifest.metrics["int8_auroc_change"] == int8["auroc_change"]
    if TRT_OK:
        assert out.returncode == 0, out.stdout + out.stderr
        assert {e["precision"] for e in manifest.engines.values()} == {"fp16", "int8"}
    else:
        assert out.returncode == 3, out.stdout + out.stderr
        assert "TensorRT unavailable" in out.stdout and "tensorrt" in out.stdout
        assert "INT8 model was built" in out.stdout
        assert manifest.engines == {}
    shown = _cli(settings, "models", "show", "chest", trained.version)
    assert shown.returncode == 0, shown.stderr
    stored = json.loads(shown.stdout)["manifest"]  # the registry copy was refreshed
    assert INT8_FILE in stored["files"] and "onnx_int8" in stored["variants"]


def test_int8_model_scores_like_fp32(trained: TrainResult, settings: Settings) -> None:
    if not (trained.bundle_dir / INT8_FILE).is_file():
        compile_bundle(settings, trained.bundle_dir, tensorrt=False)
    assert trained.manifest is not None
    x = synthetic_set(16, trained.manifest, seed=99).x
    fp32 = onnx_scores(trained.bundle_dir / "model.onnx", x)
    int8 = onnx_scores(trained.bundle_dir / INT8_FILE, x)
    assert int8.shape == fp32.shape == (16, 1)
    assert float(np.max(np.abs(int8 - fp32))) < 0.1


def test_compile_refuses_an_altered_bundle(trained: TrainResult, settings: Settings,
                                           tmp_path: Path) -> None:
    bundle = tmp_path / "altered"
    shutil.copytree(trained.bundle_dir, bundle)
    with (bundle / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    out = _cli(settings, "compile", str(bundle))
    assert out.returncode == 1 and "model.onnx" in out.stderr and "sha256" in out.stderr
    before = load_manifest(trained.bundle_dir, verify=False)
    assert load_manifest(bundle, verify=False).files == before.files  # not laundered


@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT unavailable: {TRT_REASON}")
def test_tensorrt_engines_are_built_and_named_by_gpu(trained: TrainResult,
                                                     settings: Settings) -> None:
    from lightbox.trt_engine import current_identity, engine_filename

    report = compile_bundle(settings, trained.bundle_dir, max_batch=8, calibration_images=32)
    identity = current_identity()
    manifest = load_manifest(trained.bundle_dir, verify=True)
    for precision in ("fp16", "int8"):
        name = engine_filename(precision, identity)
        assert name in report.engines and name in manifest.files
        assert manifest.engines[name]["compute_capability"] == identity.compute_capability
        assert manifest.engines[name]["max_batch"] == 8
    assert (trained.bundle_dir / "calibration.cache").is_file()
    assert "calibration.cache" in manifest.files


def test_tensorrt_branch_wiring_with_a_stand_in_gpu(
    trained: TrainResult, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs everywhere: the GPU and TensorRT builder are replaced by a stand-in (the only mock
    allowed), to check what compile hands the shared engine module and records in the
    manifest. The real build is covered by the skip-guarded test above."""
    from lightbox import trt_engine

    bundle = tmp_path / "bundle"
    shutil.copytree(trained.bundle_dir, bundle)
    identity = trt_engine.GpuIdentity("NVIDIA H200", "9.0", "10.3.0")
    calls: list[dict[str, object]] = []

    def fake_build(onnx_path: Path, engine_path: Path, **kwargs: object) -> Path:
        batches = list(kwargs.pop("calibration_batches") or [])
        assert all(b.dtype == np.float32 and b.shape[1:] == (1, 64, 64) for b in batches)
        calls.append({**kwargs, "batches": sum(len(b) for b in batches)})
        if kwargs["precision"] == "int8":
            Path(str(kwargs["calibration_cache"])).write_bytes(b"calibration table")
        engine_path.write_bytes(b"engine " + str(kwargs["precision"]).encode())
        return engine_path

    monkeypatch.setattr(trt_engine, "tensorrt_available", lambda: (True, "ok"))
    monkeypatch.setattr(trt_engine, "current_identity", lambda device=0: identity)
    monkeypatch.setattr(trt_engine, "build_engine", fake_build)
    report = compile_bundle(settings, bundle, max_batch=8, calibration_images=24)
    assert report.tensorrt_available
    profile = trt_engine.ProfileShapes("image", (1, 1, 64, 64), (8, 1, 64, 64), (8, 1, 64, 64))
    assert [(c["precision"], c["profile"], c["batches"]) for c in calls] == [
        ("fp16", profile, 0), ("int8", profile, 24)]
    manifest = load_manifest(bundle, verify=True)
    fp16 = "engine_fp16_NVIDIA-H200_sm90_trt10.3.0.plan"
    assert {fp16, "engine_int8_NVIDIA-H200_sm90_trt10.3.0.plan",
            "calibration.cache"} <= set(manifest.files)
    assert manifest.engines[fp16] == {
        "precision": "fp16", "gpu_name": "NVIDIA H200", "compute_capability": "9.0",
        "tensorrt_version": "10.3.0", "max_batch": 8, "min_batch": 1,
        "profile": profile.as_dict()}


def test_volume_bundle_engines_get_a_3d_profile_with_a_stand_in_gpu(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3-D sliding-window bundle: compile hands the engine builder an N×1×D×H×W profile from
    the manifest's roi_size and calibration volumes of that shape (SYNTHETIC phantoms on the
    model grid), records the profile, and builds no ONNX Runtime INT8 model (it says why)."""
    from lightbox import trt_engine
    from tests.volume_helpers import ROI, oracle_bundle

    bundle = oracle_bundle(tmp_path / "bundle")
    identity = trt_engine.GpuIdentity("NVIDIA H200", "9.0", "10.3.0")
    calls: list[dict[str, object]] = []

    def fake_build(onnx_path: Path, engine_path: Path, **kwargs: object) -> Path:
        batches = list(kwargs.pop("calibration_batches") or [])
        assert all(b.dtype == np.float32 and b.shape[1:] == (1, *ROI) for b in batches)
        assert all(0.0 <= b.min() and b.max() <= 1.0 for b in batches)  # windowed like training
        calls.append({**kwargs, "batches": sum(len(b) for b in batches)})
        engine_path.write_bytes(b"engine " + str(kwargs["precision"]).encode())
        return engine_path

    monkeypatch.setattr(trt_engine, "tensorrt_available", lambda: (True, "ok"))
    monkeypatch.setattr(trt_engine, "current_identity", lambda device=0: identity)
    monkeypatch.setattr(trt_engine, "build_engine", fake_build)
    report = compile_bundle(settings, bundle, max_batch=4, calibration_images=6)
    profile = trt_engine.ProfileShapes("image", (1, 1, *ROI), (4, 1, *ROI), (4, 1, *ROI))
    assert [(c["precision"], c["profile"], c["batches"]) for c in calls] == [
        ("fp16", profile, 0), ("int8", profile, 6)]
    assert "skipped" in report.int8 and not (bundle / INT8_FILE).exists()
    manifest = load_manifest(bundle, verify=True)
    engine = manifest.engines["engine_fp16_NVIDIA-H200_sm90_trt10.3.0.plan"]
    assert engine["profile"] == {"input": "image", "min": [1, 1, *ROI], "opt": [4, 1, *ROI],
                                 "max": [4, 1, *ROI]}
