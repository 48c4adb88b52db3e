"""Volume models (issue 17) trained on SYNTHETIC CT phantoms with MONAI 3-D networks: a
segmentation network (lesion mask, MONAI UNet) and a classifier (lesion present, MONAI
Classifier). Tiny on purpose, so `lightbox train --volume ...` and the demo train them in
seconds on a CPU; they are for demonstration only, and every manifest says SYNTHETIC.

Inputs go through the core's volume code (:mod:`lightbox.volume_input`: resampling to the
manifest's spacing, the intensity window) exactly as the worker applies it, so training and
serving cannot drift apart. Export: one ONNX file with a dynamic batch axis, checked against
torch on validation volumes (parity) before the bundle is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from db.model_registry import register_bundle
from db.session import session_scope
from lightbox.errors import ManifestError
from lightbox.manifest import InputSpec, Manifest, PreprocessSpec, VolumeSpec, write_bundle_manifest
from lightbox.settings import Settings
from lightbox.synthetic_volume import VOLUME_MODEL_NAMES, make_phantom
from lightbox.volume import Volume
from lightbox.volume_input import model_grid
from trainer.export import (
    OPSET,
    PARITY_TOLERANCE,
    _check_self_contained,
    _quiet_exporter,
    onnx_outputs,
    torch_outputs,
)
from trainer.metrics import auroc, youden_threshold

Kind = Literal["segmentation", "classification"]
Progress = Callable[[str, int, int], None]
SYNTHETIC_NOTE = "SYNTHETIC CT phantoms (ellipsoid lesions), not patient data"
LABEL = "lesion"
# The model grid: 2 × 2 × 2.5 mm voxels, soft-tissue window; patches of 16 × 32 × 32 voxels.
SPACING = (2.0, 2.0, 2.5)
ROI = (16, 32, 32)
DEFAULT_NAMES = VOLUME_MODEL_NAMES


@dataclass
class VolumeTrainResult:
    bundle_dir: Path
    manifest: Manifest
    model_id: int | None
    seconds: float


class _Sigmoid(nn.Module):
    """Probabilities inside the graph: workers read them as they are."""

    def __init__(self, network: nn.Module, flatten: bool) -> None:
        super().__init__()
        self.network = network
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.sigmoid(self.network(x))
        return out.reshape(out.shape[0], -1) if self.flatten else out


def build_volume_network(kind: Kind) -> nn.Module:
    """Batch norm, not MONAI's default instance norm: instance norm rescales each small patch
    by its own statistics and erases the absolute HU level a lesion is told apart by."""
    from monai.networks.nets import Classifier, UNet

    if kind == "segmentation":
        return _Sigmoid(UNet(spatial_dims=3, in_channels=1, out_channels=1,
                             channels=(4, 8), strides=(2,), num_res_units=0, norm="batch"), False)
    return _Sigmoid(Classifier(in_shape=(1, *ROI), classes=1, channels=(4, 8, 16),
                               strides=(2, 2, 2)), True)


def volume_spec(kind: Kind) -> VolumeSpec:
    return VolumeSpec(spacing=SPACING, orientation="LPS", window_center=40.0, window_width=300.0,
                      mode="sliding_window" if kind == "segmentation" else "fixed",
                      roi_size=ROI, overlap=0.25,
                      output="segmentation" if kind == "segmentation" else "classification",
                      min_slices=8, min_lesion_ml=0.3)


def synthetic_volumes(count: int, seed: int, spec: VolumeSpec, lesion_fraction: float = 0.5
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` phantoms of the spec's ``roi_size`` on the model grid through
    :func:`model_grid`: inputs (N, 1, *roi), masks (N, 1, *roi) and labels (N,) (1 = a lesion
    is present). Also the calibration inputs of ``lightbox compile`` for volume bundles."""
    roi = tuple(spec.roi_size)
    inputs = np.empty((count, 1, *roi), np.float32)
    masks = np.empty((count, 1, *roi), np.float32)
    labels = np.zeros(count, np.float32)
    for index in range(count):
        lesions = int(index < round(count * lesion_fraction))
        phantom = make_phantom(roi, lesions=lesions, seed=seed * 100_003 + index,
                               lesion_radius=(2.0, 4.0))
        volume = Volume(array=phantom.hu, origin=(0.0, 0.0, 0.0), spacing=spec.spacing,
                        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
        inputs[index, 0] = model_grid(volume, spec).array
        masks[index, 0] = phantom.mask
        labels[index] = float(phantom.mask.any())
    order = np.random.default_rng(seed).permutation(count)
    return inputs[order], masks[order], labels[order]


def _loss(kind: Kind, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "classification":
        return nn.functional.binary_cross_entropy(out.clamp(1e-6, 1 - 1e-6), target)
    # Lesions are a few per cent of the voxels: weight them up, or "nothing" is a cheap optimum.
    bce = nn.functional.binary_cross_entropy(out.clamp(1e-6, 1 - 1e-6), target,
                                             weight=1.0 + 9.0 * target)
    overlap = (out * target).sum(dim=(1, 2, 3, 4))
    dice = 1 - (2 * overlap + 1) / (out.sum(dim=(1, 2, 3, 4)) + target.sum(dim=(1, 2, 3, 4)) + 1)
    return bce + dice.mean()


def export_volume_onnx(model: nn.Module, path: Path, manifest: Manifest) -> None:
    """One self-contained ONNX file, input (batch, 1, z, y, x), batch axis dynamic (the
    worker batches patches of several series in one call)."""
    spec = manifest.input
    example = torch.zeros(2, spec.channels, spec.depth or 1, spec.height, spec.width)
    model.eval()
    with _quiet_exporter():
        torch.onnx.export(model, (example,), str(path), input_names=[spec.name],
                          output_names=[manifest.output_name],
                          dynamic_shapes=({0: torch.export.Dim("batch")},),
                          opset_version=OPSET, dynamo=True, external_data=False, optimize=True,
                          verbose=False)
    _check_self_contained(path)


def train_volume_model(settings: Settings, kind: Kind, name: str | None = None,
                       volumes: int = 40, steps: int = 40, batch: int = 4, seed: int = 0,
                       version: str | None = None, register: bool = True, promote: bool = True,
                       progress: Progress | None = None) -> VolumeTrainResult:
    """Train, validate, export with parity, write the bundle; register (and promote) it."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    spec = volume_spec(kind)
    name = name or DEFAULT_NAMES[kind]
    inputs, masks, labels = synthetic_volumes(volumes, seed, spec)
    val = max(4, volumes // 5)
    train_x, train_y = inputs[val:], (masks if kind == "segmentation" else labels[:, None])[val:]
    model = build_volume_network(kind)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = np.random.default_rng(seed)
    model.train()
    for step in range(steps):
        chosen = generator.choice(len(train_x), size=min(batch, len(train_x)), replace=False)
        optimiser.zero_grad()
        loss = _loss(kind, model(torch.from_numpy(train_x[chosen])),
                     torch.from_numpy(np.ascontiguousarray(train_y[chosen])))
        loss.backward()
        optimiser.step()
        if progress:
            progress(f"training {name} (SYNTHETIC volumes)", step + 1, steps)
    val_x = inputs[:val]
    out = torch_outputs(model, val_x, batch=8)[0]
    metrics: dict[str, float] = {"train_volumes": float(len(train_x)), "val_volumes": float(val)}
    if kind == "segmentation":
        # The voxel threshold: the best Dice on validation volumes.
        truth = masks[:val] > 0.5
        dice = {t: float(2 * ((out > t) & truth).sum() / max(1, (out > t).sum() + truth.sum()))
                for t in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)}
        best = max(dice, key=lambda t: dice[t])
        spec = spec.model_copy(update={"segment_threshold": best})
        metrics["val_dice"] = dice[best]
        scores = out.reshape(val, -1).max(axis=1)
    else:
        scores = out[:, 0]
    truth_labels = labels[:val]
    if 0 < truth_labels.sum() < val:
        metrics["val_auroc"] = float(auroc(scores, truth_labels))
        threshold = float(youden_threshold(scores, truth_labels)[0])
    else:
        threshold = 0.5
    version = version or datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    bundle_dir = settings.models_dir / name / version
    bundle_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(
        name=name, version=version, task="binary", architecture=(
            "monai_unet3d_tiny" if kind == "segmentation" else "monai_classifier3d_tiny"),
        input=InputSpec(channels=1, depth=ROI[0], height=ROI[1], width=ROI[2]),
        output_name="probabilities" if kind == "segmentation" else "scores",
        preprocessing=PreprocessSpec(), labels=[LABEL],
        thresholds={LABEL: threshold if kind == "classification" else spec.segment_threshold},
        level="study", metrics=metrics, volume=spec,
        training_data={"source": "synthetic", "synthetic": True, "note": SYNTHETIC_NOTE,
                       "volumes": volumes, "seed": seed},
        created_at=datetime.now(UTC).isoformat())
    path = bundle_dir / "model.onnx"
    export_volume_onnx(model, path, manifest)
    diff = float(np.max(np.abs(onnx_outputs(path, val_x)[0] - out)))
    if not diff <= PARITY_TOLERANCE:
        raise ManifestError(f"ONNX export of {name} {version} differs from torch by {diff:.2e} "
                            f"(tolerance {PARITY_TOLERANCE:.0e})")
    manifest = write_bundle_manifest(bundle_dir, manifest.model_copy(update={
        "parity": {"max_abs_diff": diff, "bound": PARITY_TOLERANCE, "images": float(val)},
        "metrics": {**metrics, "parity_max_abs_diff": diff}}))
    model_id = None
    if register:
        with session_scope(settings.sqlalchemy_url) as session:
            model_id = register_bundle(session, bundle_dir, promote=promote).id
    return VolumeTrainResult(bundle_dir, manifest, model_id, time.perf_counter() - started)
