"""Export a trained model to a self-contained ONNX bundle and prove it scores like torch.

The bundle is what workers serve, so it is checked before anyone can register it: one
``model.onnx`` file (no external-data sidecar to lose), and ONNX Runtime's scores on the
validation images within :data:`PARITY_TOLERANCE` of torch's.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from lightbox.errors import ManifestError
from lightbox.manifest import Manifest, write_bundle_manifest

MODEL_FILE = "model.onnx"
OPSET = 18  # the lowest opset the torch.export-based exporter implements natively
PARITY_TOLERANCE = 1e-4
CAM_RELATIVE_TOLERANCE = 1e-4  # of the largest |CAM| (logit units), at least 1e-4 absolute
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration",)  # "torchvision not installed"


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's chatter (missing torchvision ops, internal deprecations)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def output_names(manifest: Manifest) -> list[str]:
    """Scores first; the class-activation map second when the manifest names one."""
    return [manifest.output_name] + ([manifest.cam_output] if manifest.cam_output else [])


def export_onnx(model: nn.Module, path: Path, manifest: Manifest) -> None:
    """Write ``model`` as one ONNX file with a dynamic batch axis and the manifest's I/O names.

    Uses the torch.export-based exporter (the legacy TorchScript one is deprecated in torch 2.x
    and slated for removal); ``external_data=False`` keeps the weights inside the file. The
    seed CNN and both MONAI networks (DenseNet121, ResNet18, with the CAM output) export with
    it at opset 18, so there is no TorchScript fallback.
    """
    spec = manifest.input
    example = torch.zeros(2, spec.channels, spec.height, spec.width, dtype=torch.float32)
    model.eval()
    with _quiet_exporter():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[spec.name],
            output_names=output_names(manifest),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    _check_self_contained(path)


def _check_self_contained(path: Path) -> None:
    """Refuse a model whose weights live in another file: a bundle must travel as a unit."""
    graph = onnx.load(str(path), load_external_data=False).graph
    external = [t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ManifestError(f"{path.name} keeps {len(external)} tensors in external data files")
    onnx.checker.check_model(str(path))


def onnx_outputs(path: Path, images: np.ndarray) -> list[np.ndarray]:
    """Every output from ONNX Runtime on CPU, the runtime every worker has."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [np.asarray(o) for o in session.run(None, {name: images.astype(np.float32,
                                                                           copy=False)})]


def onnx_scores(path: Path, images: np.ndarray) -> np.ndarray:
    """Scores (the first output) from ONNX Runtime on CPU."""
    return onnx_outputs(path, images)[0]


def torch_outputs(model: nn.Module, images: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    model.eval()
    parts: list[list[np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch], np.float32))
            out = model(x)
            parts.append([t.numpy() for t in (out if isinstance(out, tuple) else (out,))])
    return [np.concatenate(column) for column in zip(*parts, strict=True)]


def torch_scores(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """Probabilities (the first output) from torch, in batches."""
    return torch_outputs(model, images)[0]


def parity(model: nn.Module, path: Path, images: np.ndarray) -> dict[str, float]:
    """Largest |ONNX Runtime − torch| over ``images`` for the scores (and the CAM, relative to
    its largest magnitude): the exported graph must be the model."""
    from_onnx, from_torch = onnx_outputs(path, images), torch_outputs(model, images)
    result = {"max_abs_diff": float(np.max(np.abs(from_onnx[0] - from_torch[0]))),
              "bound": PARITY_TOLERANCE, "images": float(len(images))}
    if len(from_onnx) > 1:
        scale = max(1.0, float(np.max(np.abs(from_torch[1]))))
        result["cam_max_abs_diff"] = float(np.max(np.abs(from_onnx[1] - from_torch[1])))
        result["cam_bound"] = CAM_RELATIVE_TOLERANCE * scale
    return result


def parity_max_abs_diff(model: nn.Module, path: Path, images: np.ndarray) -> float:
    """Largest |ONNX Runtime − torch| of the scores over ``images``."""
    return parity(model, path, images)["max_abs_diff"]


def write_bundle(
    model: nn.Module, manifest: Manifest, bundle_dir: Path, parity_images: np.ndarray
) -> Manifest:
    """Export, check parity on ``parity_images`` and write ``manifest.json`` with file hashes.

    Raises :class:`ManifestError` when ONNX Runtime disagrees with torch by more than
    :data:`PARITY_TOLERANCE` (or the CAM by more than its bound); the returned manifest carries
    ``parity`` and ``metrics["parity_max_abs_diff"]``. Every file already in ``bundle_dir``
    (plots) is hashed too.
    """
    path = bundle_dir / MODEL_FILE
    export_onnx(model, path, manifest)
    result = parity(model, path, parity_images)
    diff = result["max_abs_diff"]
    if not diff <= PARITY_TOLERANCE:  # also catches NaN
        raise ManifestError(
            f"ONNX export of {manifest.name} {manifest.version} differs from torch by {diff:.2e} "
            f"(tolerance {PARITY_TOLERANCE:.0e})"
        )
    if "cam_max_abs_diff" in result and not result["cam_max_abs_diff"] <= result["cam_bound"]:
        raise ManifestError(
            f"ONNX export of {manifest.name} {manifest.version}: class-activation maps differ "
            f"from torch by {result['cam_max_abs_diff']:.2e} (bound {result['cam_bound']:.1e})"
        )
    metrics = {**manifest.metrics, "parity_max_abs_diff": diff}
    return write_bundle_manifest(
        bundle_dir, manifest.model_copy(update={"metrics": metrics, "parity": result}))
