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


def export_onnx(model: nn.Module, path: Path, manifest: Manifest) -> None:
    """Write ``model`` as one ONNX file with a dynamic batch axis and the manifest's I/O names.

    Uses the torch.export-based exporter (the legacy TorchScript one is deprecated in torch 2.x
    and slated for removal); ``external_data=False`` keeps the weights inside the file.
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
            output_names=[manifest.output_name],
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


def onnx_scores(path: Path, images: np.ndarray) -> np.ndarray:
    """Scores from ONNX Runtime on CPU, the runtime every worker has."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: images.astype(np.float32, copy=False)})[0])


def torch_scores(model: nn.Module, images: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(images, np.float32))).numpy()


def parity_max_abs_diff(model: nn.Module, path: Path, images: np.ndarray) -> float:
    """Largest |ONNX Runtime − torch| over ``images``: the exported graph must be the model."""
    return float(np.max(np.abs(onnx_scores(path, images) - torch_scores(model, images))))


def write_bundle(
    model: nn.Module, manifest: Manifest, bundle_dir: Path, parity_images: np.ndarray
) -> Manifest:
    """Export, check parity on ``parity_images`` and write ``manifest.json`` with file hashes.

    Raises :class:`ManifestError` when ONNX Runtime disagrees with torch by more than
    :data:`PARITY_TOLERANCE`; the returned manifest carries ``parity_max_abs_diff``.
    """
    path = bundle_dir / MODEL_FILE
    export_onnx(model, path, manifest)
    diff = parity_max_abs_diff(model, path, parity_images)
    if not diff <= PARITY_TOLERANCE:  # also catches NaN
        raise ManifestError(
            f"ONNX export of {manifest.name} {manifest.version} differs from torch by {diff:.2e} "
            f"(tolerance {PARITY_TOLERANCE:.0e})"
        )
    metrics = {**manifest.metrics, "parity_max_abs_diff": diff}
    return write_bundle_manifest(bundle_dir, manifest.model_copy(update={"metrics": metrics}))
