"""``lightbox compile``: faster forms of a finished bundle's ``model.onnx``.

* Always: an ONNX Runtime INT8 model (static quantization, QDQ, per-channel weights) for CPU
  nodes, calibrated on a sample of the bundle's training images and compared with FP32 on its
  validation images; the change is recorded in ``manifest.variants["onnx_int8"]``.
* Where TensorRT imports and a GPU is present: FP16 and INT8 engines through
  :mod:`lightbox.trt_engine` (the worker's engine cache uses the same module), INT8 calibrated
  on the same sample with the calibration cache kept in the bundle. Engine files are named by
  GPU, compute capability and TensorRT version and listed in ``manifest.engines``.

The training images are re-read from the source the manifest's ``training_data`` names (the
prepared-image cache makes this cheap) and re-split with the recorded seed, so calibration
uses training images only and evaluation validation images only. Every added file is hashed
into the manifest (rewritten), and a registered bundle's stored manifest is refreshed.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightbox.errors import ConfigurationError, ManifestError
from lightbox.manifest import Manifest, load_manifest, write_bundle_manifest
from lightbox.settings import Settings
from trainer.datasets import LabelledSet, load_source, source_from_summary
from trainer.export import MODEL_FILE, onnx_outputs
from trainer.metrics import mean_auroc
from trainer.splits import patient_split

log = logging.getLogger(__name__)
INT8_FILE = "model.int8.onnx"
CALIBRATION_CACHE = "calibration.cache"
ENGINE_PRECISIONS = ("fp16", "int8")
Progress = Callable[[str, int, int], None]


@dataclass
class CompileReport:
    bundle_dir: Path
    int8: dict[str, Any]
    tensorrt_available: bool
    tensorrt_reason: str
    engines: dict[str, dict[str, object]] = field(default_factory=dict)


def training_images(settings: Settings, manifest: Manifest) -> LabelledSet:
    """The bundle's training data, re-opened from its recorded source."""
    summary: dict[str, Any] = manifest.training_data
    if summary.get("kind") == "synthetic":
        from trainer.synthetic_dataset import synthetic_set

        data = synthetic_set(int(summary["images"]), manifest, seed=int(summary["seed"]),
                             opacity_scale=float(summary.get("opacity_scale", 1.0)))
    else:
        from trainer.train import train_cache_dir

        data = load_source(source_from_summary(summary), manifest, train_cache_dir(settings))
    if len(data) != int(summary.get("images", len(data))):
        raise ConfigurationError(
            f"training source now has {len(data)} images, the bundle was trained on "
            f"{summary.get('images')}: cannot reproduce its split for calibration")
    return data


def calibration_and_validation(
    settings: Settings, manifest: Manifest, calibration_images: int
) -> tuple[np.ndarray, LabelledSet]:
    """(a seeded sample of training images, the validation set) by the recorded split."""
    data = training_images(settings, manifest)
    split_spec = dict(manifest.training_data.get("split", {}))  # type: ignore[call-overload]
    split = patient_split(data.patients, data.y, val_fraction=float(split_spec["val_fraction"]),
                          test_fraction=float(split_spec.get("test_fraction", 0.0)),
                          seed=int(split_spec["seed"]))
    rng = np.random.default_rng(int(split_spec["seed"]))
    sample = rng.permutation(split.train)[:calibration_images]
    return data.x[np.sort(sample)], data.subset(split.validation)


def _batches(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x), size):
        yield np.ascontiguousarray(x[start : start + size], np.float32)


def _accuracy(scores: np.ndarray, y: np.ndarray, manifest: Manifest) -> float:
    if manifest.task == "multiclass":
        return float((scores.argmax(1) == y.argmax(1)).mean())
    thresholds = np.array([manifest.threshold_for(label) for label in manifest.labels])
    return float(((scores >= thresholds) == (y > 0.5)).mean())


def quantize_int8(bundle_dir: Path, manifest: Manifest, calibration: np.ndarray,
                  validation: LabelledSet) -> dict[str, Any]:
    """Write ``model.int8.onnx`` and return its accuracy change against FP32."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(_batches(calibration, 8))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {manifest.input.name: batch}

    with tempfile.TemporaryDirectory(prefix="lightbox-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(bundle_dir / MODEL_FILE), str(prepared), skip_symbolic_shape=True)
        out = Path(tmp) / INT8_FILE
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        out.replace(bundle_dir / INT8_FILE)
    fp32 = onnx_outputs(bundle_dir / MODEL_FILE, validation.x)[0]
    int8 = onnx_outputs(bundle_dir / INT8_FILE, validation.x)[0]
    result: dict[str, Any] = {
        "file": INT8_FILE, "runtime": "onnxruntime", "method": "static QDQ, per-channel "
        "QInt8 weights, QUInt8 activations, MinMax calibration",
        "calibration_images": int(len(calibration)), "validation_images": int(len(validation)),
        "auroc_fp32": mean_auroc(fp32, validation.y), "auroc_int8": mean_auroc(int8, validation.y),
        "accuracy_fp32": _accuracy(fp32, validation.y, manifest),
        "accuracy_int8": _accuracy(int8, validation.y, manifest),
        "max_abs_diff": float(np.max(np.abs(fp32 - int8))),
    }
    result["auroc_change"] = float(result["auroc_int8"]) - float(result["auroc_fp32"])
    result["accuracy_change"] = float(result["accuracy_int8"]) - float(result["accuracy_fp32"])
    return result


def build_engines(bundle_dir: Path, manifest: Manifest, calibration: np.ndarray,
                  max_batch: int) -> dict[str, dict[str, object]]:
    """FP16 and INT8 TensorRT engines for this node's GPU (raises TensorRTUnavailable or
    EngineBuildError), with the profile the manifest implies (:func:`lightbox.trt_engine.
    profile_shapes`: N×C×D×H×W patches for volume models)."""
    from lightbox import trt_engine

    identity = trt_engine.current_identity()
    profile = trt_engine.profile_shapes(manifest, max_batch)
    largest = profile.max[0]
    engines: dict[str, dict[str, object]] = {}
    for precision in ENGINE_PRECISIONS:
        path = bundle_dir / trt_engine.engine_filename(precision, identity)
        trt_engine.build_engine(
            bundle_dir / MODEL_FILE, path, precision=precision,  # type: ignore[arg-type]
            profile=profile,
            calibration_batches=_batches(calibration, largest) if precision == "int8" else None,
            calibration_cache=bundle_dir / CALIBRATION_CACHE if precision == "int8" else None,
        )
        engines[path.name] = {
            "precision": precision, "gpu_name": identity.gpu_name,
            "compute_capability": identity.compute_capability,
            "tensorrt_version": identity.tensorrt_version, "max_batch": largest,
            "min_batch": 1, "profile": profile.as_dict(),
            **({"calibration_cache": CALIBRATION_CACHE,
                "calibration_images": int(len(calibration))} if precision == "int8" else {}),
        }
    return engines


def compile_bundle(
    settings: Settings, bundle_dir: Path, *, max_batch: int = 16, calibration_images: int = 64,
    tensorrt: bool = True, progress: Progress | None = None,
) -> CompileReport:
    """Build the ONNX Runtime INT8 model, then TensorRT engines when TensorRT is usable, and
    rewrite the manifest with the new files' hashes."""
    from lightbox.trt_engine import tensorrt_available

    progress = progress or (lambda stage, done, total: None)
    bundle_dir = Path(bundle_dir).resolve()
    manifest = load_manifest(bundle_dir, verify=True)
    if manifest.kind == "tabular":
        # A few-kilobyte MLP on header values: ONNX Runtime FP32 already runs it in
        # microseconds, and there are no images to calibrate INT8 or an engine with.
        raise ConfigurationError(
            f"{manifest.name} {manifest.version} is a metadata (tabular) model: nothing to "
            "compile, the worker runs its model.onnx with ONNX Runtime as it is")
    if manifest.input.channels < 1 or calibration_images < 1:
        raise ManifestError("nothing to calibrate with")
    if manifest.volume is not None:
        return _compile_volume(settings, bundle_dir, manifest, max_batch, calibration_images,
                               tensorrt, progress)
    progress("reading calibration images", 0, 1)
    calibration, validation = calibration_and_validation(settings, manifest, calibration_images)
    progress("ONNX Runtime INT8", 0, 1)
    int8 = quantize_int8(bundle_dir, manifest, calibration, validation)
    progress("ONNX Runtime INT8", 1, 1)
    ok, reason = tensorrt_available() if tensorrt else (False, "TensorRT not requested")
    engines: dict[str, dict[str, object]] = {}
    if ok:
        progress("TensorRT engines", 0, 1)
        engines = build_engines(bundle_dir, manifest, calibration, max_batch)
        progress("TensorRT engines", 1, 1)
    metrics = {**manifest.metrics, "int8_auroc_change": float(int8["auroc_change"])}
    # Verified above; since then only this function wrote files (re-running compile replaces
    # its own outputs), so rehash everything now.
    write_bundle_manifest(bundle_dir, manifest.model_copy(update={
        "variants": {**manifest.variants, "onnx_int8": int8},
        "engines": {**manifest.engines, **engines}, "metrics": metrics}))
    _refresh_registry(settings, bundle_dir)
    return CompileReport(bundle_dir, int8, ok, reason, engines)


def _compile_volume(settings: Settings, bundle_dir: Path, manifest: Manifest, max_batch: int,
                    calibration_images: int, tensorrt: bool, progress: Progress
                    ) -> CompileReport:
    """A volume bundle: TensorRT FP16/INT8 engines with an N×C×D×H×W profile, calibrated on
    SYNTHETIC phantoms put on the model grid the way training did. No ONNX Runtime INT8 model:
    its check is a validation AUROC over labelled images, which a segmentation network's
    voxel maps do not have; the worker runs such bundles' ``model.onnx`` on ONNX Runtime."""
    from lightbox.trt_engine import tensorrt_available
    from trainer.volume_train import synthetic_volumes

    spec = manifest.volume
    assert spec is not None
    if not manifest.training_data.get("synthetic"):
        raise ConfigurationError(
            f"{manifest.name} {manifest.version}: volume bundles are calibrated on the "
            "synthetic phantoms they were trained on; this one records other training data")
    int8: dict[str, Any] = {"skipped": "volume model: ONNX Runtime INT8 has no validation "
                                       "set to check it against"}
    ok, reason = tensorrt_available() if tensorrt else (False, "TensorRT not requested")
    engines: dict[str, dict[str, object]] = {}
    if ok:
        progress("calibration volumes", 0, 1)
        seed = int(manifest.training_data.get("seed", 0))  # type: ignore[call-overload]
        calibration = synthetic_volumes(calibration_images, seed + 1, spec)[0]
        progress("TensorRT engines", 0, 1)
        engines = build_engines(bundle_dir, manifest, calibration, max_batch)
        progress("TensorRT engines", 1, 1)
        write_bundle_manifest(bundle_dir, manifest.model_copy(update={
            "engines": {**manifest.engines, **engines}}))
        _refresh_registry(settings, bundle_dir)
    return CompileReport(bundle_dir, int8, ok, reason, engines)


def _refresh_registry(settings: Settings, bundle_dir: Path) -> None:
    """A registered bundle's stored manifest gains the new files (workers read the bundle's
    own manifest; the registry copy is for `lightbox models show`)."""
    from db.model_registry import find_by_bundle, register_bundle
    from db.session import session_scope

    with session_scope(settings.sqlalchemy_url) as session:
        if find_by_bundle(session, bundle_dir) is not None:
            register_bundle(session, bundle_dir)
