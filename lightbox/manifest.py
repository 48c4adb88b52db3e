"""The model bundle manifest: what a worker needs to serve a model exactly as it was trained.

A bundle is a directory holding ``manifest.json`` and the files it lists (``model.onnx``, ...),
each with its sha256. Workers refuse a bundle whose files do not match.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from lightbox.errors import ManifestError

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1


class InputSpec(BaseModel):
    name: str = "image"
    channels: int = 1
    depth: int | None = None  # volume models: the input is (N, channels, depth, height, width)
    height: int
    width: int
    dtype: Literal["float32"] = "float32"
    dynamic_batch: bool = True


class PreprocessSpec(BaseModel):
    """How stored pixels become the model's input. Applied by :mod:`lightbox.preprocess`."""

    # Display conversion (lightbox.pixels): modality LUT, VOI window, MONOCHROME1 inversion.
    voi: Literal["window", "percentile"] = "window"
    percentile_low: float = 0.5
    percentile_high: float = 99.5
    resize: Literal["area", "bilinear"] = "area"
    keep_aspect: bool = False
    mean: float = 0.5
    std: float = 0.25


class FeatureSpec(BaseModel):
    """One DICOM header value as model input (metadata models), encoded as trained.

    ``numeric``: standardised with the training mean and std; missing → the training mean
    (0 after standardising) plus a 1 in its own missing-indicator column. ``categorical``:
    one-hot over the training categories plus an "other or missing" column."""

    keyword: str
    type: Literal["numeric", "categorical"]
    mean: float = 0.0
    std: float = 1.0
    categories: list[str] = Field(default_factory=list)

    @property
    def width(self) -> int:
        return 2 if self.type == "numeric" else len(self.categories) + 1
class VolumeSpec(BaseModel):
    """How a CT/MR series becomes a volume model's input (:mod:`lightbox.volume`,
    :mod:`lightbox.volume_input`). Present only on volume models; 2-D bundles have none.

    Either a fixed input (the resampled volume is centre-cropped / padded to ``roi_size``, one
    forward pass: classifiers) or sliding-window inference (``roi_size`` patches overlapping by
    ``overlap``, stitched with Gaussian weights: segmentation)."""

    spacing: tuple[float, float, float] = Field(
        description="target voxel spacing in mm, (x, y, z) as SimpleITK orders it")
    orientation: str = Field(default="LPS", description="DICOM orientation code of the i, j, k "
                             "axes after resampling (axes permuted/flipped, never interpolated)")
    window_center: float = Field(description="intensity window centre (HU for CT)")
    window_width: float = Field(description="intensity window width; values map to 0..1")
    mode: Literal["fixed", "sliding_window"] = "sliding_window"
    roi_size: tuple[int, int, int] = Field(description="input or patch size (z, y, x) voxels")
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    blend: Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: float = Field(default=0.125, gt=0.0,
                               description="Gaussian sigma as a fraction of the patch size")
    output: Literal["classification", "segmentation"] = "segmentation"
    spacing_tolerance: float = Field(default=0.1, description="a slice step may differ from the "
                                     "series' spacing by this fraction before the job fails")
    min_slices: int = 8
    segment_threshold: float = Field(default=0.5, description="probability above which a voxel "
                                     "is lesion (segmentation)")
    min_lesion_ml: float = Field(default=0.0, ge=0.0, description="connected components "
                                 "smaller than this are not lesions (speckle), in mL")


class FusionSpec(BaseModel):
    """A late-fusion head: a metadata model whose input also holds an image model's scores on
    the same image, appended after the header features in ``scores`` order. The worker runs
    that image model (exactly ``model`` ``version``, the production version the head was
    trained on) and then the head, decoding the pixels once."""

    model: str
    version: str
    scores: list[str] = Field(description="The image model's labels whose scores are inputs.")

    @property
    def width(self) -> int:
        return len(self.scores)


class Manifest(BaseModel):
    schema_version: int = MANIFEST_SCHEMA
    name: str
    version: str
    task: Literal["binary", "multilabel", "multiclass"] = "binary"
    architecture: str
    input: InputSpec
    output_name: str = "scores"
    # Name of a second output holding class-activation maps, shaped (N, labels, h, w), for
    # networks with a global-pooling head; workers save them as heatmaps (lightbox.heatmaps).
    cam_output: str | None = None
    # Scores are probabilities already (sigmoid/softmax inside the graph).
    preprocessing: PreprocessSpec
    labels: list[str]
    thresholds: dict[str, float]
    level: Literal["instance", "study"] = "instance"
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    metrics: dict[str, float] = Field(default_factory=dict)
    training_data: dict[str, object] = Field(default_factory=dict)
    created_at: str | None = None
    # Added by the trainer (issue 3); all optional so that older manifests still load.
    threshold_policy: str | None = Field(
        default=None, description='How thresholds were chosen on validation: "youden" or '
        '"sensitivity:0.90" (the lowest threshold reaching that sensitivity).')
    confusion: dict[str, list[list[int]]] = Field(
        default_factory=dict, description="label -> [[TN, FP], [FN, TP]] at its threshold "
        "(validation); multiclass adds '__classes__': rows true class, columns argmax class.")
    parity: dict[str, float] = Field(
        default_factory=dict, description="ONNX Runtime vs torch on validation images: "
        "max_abs_diff, bound, images (and cam_max_abs_diff for CAM networks).")
    variants: dict[str, dict[str, object]] = Field(
        default_factory=dict, description="Extra runnable forms of the model, e.g. 'onnx_int8': "
        "file, method and its accuracy change against FP32 on validation images.")
    engines: dict[str, dict[str, object]] = Field(
        default_factory=dict, description="TensorRT engine file -> precision, gpu_name, "
        "compute_capability, tensorrt_version, max_batch (built by `lightbox compile`).")
    plots: list[str] = Field(default_factory=list, description="PNG files in the bundle.")
    # Added by issue 23 (task-aware outputs, honest training); optional for older manifests.
    background_class: str | None = Field(
        default=None, description="multiclass: the class that is no finding (e.g. 'normal'); "
        "predicted, it is reported as absent, never present.")
    confident_threshold: float | None = Field(
        default=None, description="multiclass: a top probability below this is 'indeterminate' "
        "(chosen on validation); None: every prediction is decided.")
    # "tabular": the input is a vector of header values (``features``), shaped
    # (N, width, 1, 1) so runtimes and batchers treat it like any tensor; no pixels decoded.
    kind: Literal["image", "tabular"] = "image"
    features: list[FeatureSpec] = Field(default_factory=list)
    fuse_with: FusionSpec | None = Field(
        default=None, description="tabular: an image model whose scores on the same image are "
        "extra inputs (a late-fusion head); None: header values only.")
    monitor: str | None = Field(
        default=None, description="What early stopping monitored and the best epoch was kept "
        "by: 'val_loss' (default), 'auroc' or 'accuracy'.")
    # Volume models (issue 17): a CT/MR series in, series-level findings out. Default None keeps
    # every 2-D bundle valid.
    volume: VolumeSpec | None = None

    def threshold_for(self, label: str) -> float:
        return self.thresholds.get(label, 0.5)

    @property
    def synthetic(self) -> bool:
        """Trained on SYNTHETIC data: its findings say so, everywhere they are shown."""
        return self.training_data.get("kind") == "synthetic" or bool(
            self.training_data.get("synthetic"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_bundle_manifest(bundle_dir: Path, manifest: Manifest) -> Manifest:
    """Hash every file in the bundle (except the manifest) into the manifest and write it."""
    files = {
        p.name: sha256_file(p)
        for p in sorted(bundle_dir.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = manifest.model_copy(update={"files": files})
    (bundle_dir / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
    return manifest


def update_bundle_manifest(bundle_dir: Path, **changes: object) -> Manifest:
    """Verify a bundle, apply ``changes`` to its manifest and rehash every file.

    Used when files are added to a finished bundle (INT8 model, engines): files already listed
    must still match, so an altered bundle cannot be laundered by rehashing it."""
    manifest = load_manifest(bundle_dir, verify=True)
    return write_bundle_manifest(bundle_dir, manifest.model_copy(update=changes))


def load_manifest(bundle_dir: Path, verify: bool = True) -> Manifest:
    """Read a bundle's manifest; with ``verify``, refuse it unless every file matches its hash."""
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in bundle {bundle_dir}")
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"invalid manifest in {bundle_dir}: {exc}") from exc
    if verify:
        verify_bundle(bundle_dir, manifest)
    return manifest


def verify_bundle(bundle_dir: Path, manifest: Manifest) -> None:
    if "model.onnx" not in manifest.files:
        raise ManifestError(f"bundle {bundle_dir} lists no model.onnx")
    for name, expected in manifest.files.items():
        file = bundle_dir / name
        if not file.is_file():
            raise ManifestError(f"bundle {bundle_dir} is missing {name}")
        actual = sha256_file(file)
        if actual != expected:
            raise ManifestError(
                f"bundle {bundle_dir}: {name} has sha256 {actual[:12]}…, manifest says "
                f"{expected[:12]}… (file altered or corrupt)"
            )
