"""Train a model on labelled DICOM (or SYNTHETIC) images into a verified, versioned bundle.

The path: load (decode with the worker's preprocessing, cached) → split by patient →
fit (validation every epoch, early stopping, best epoch kept, resumable) → choose thresholds
on validation → ROC and learning-curve PNGs → ONNX export with a parity check → manifest with
every file's sha256 → register (and promote).

Everything is seeded (split, initialisation, batch order) and torch runs deterministic
algorithms on 2 threads, so the same seed and data give the same weights, metrics and
``model.onnx``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from torch import nn

from db.model_registry import register_bundle
from db.session import session_scope
from lightbox.manifest import FeatureSpec, FusionSpec, InputSpec, Manifest, PreprocessSpec
from lightbox.settings import Settings
from trainer.architectures import Scorer, build_network, has_cam
from trainer.datasets import LabelledSet, load_source, open_source
from trainer.export import torch_scores, write_bundle
from trainer.loop import FitConfig, deterministic_torch, fit, probabilities, run_digest
from trainer.metrics import (
    auroc,
    bce,
    choose_threshold,
    confusion,
    mean_auroc,
    multiclass_confusion,
    youden_threshold,
)
from trainer.plots import (
    CONFUSION_PNG,
    LEARNING_PNG,
    ROC_PNG,
    confusion_png,
    learning_png,
    roc_png,
)
from trainer.seed_cnn import INPUT_SIZE
from trainer.splits import balance_report, patient_split
from trainer.synthetic_dataset import synthetic_set

# auroc, bce, youden_threshold and torch_scores are re-exported for callers of the first trainer.
__all__ = ["TrainConfig", "TrainResult", "auroc", "bce", "draft_manifest", "load_training_data",
           "stratified_split", "torch_scores", "train_model", "train_seed_cnn",
           "youden_threshold"]

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; the stage doubles as a progress-bar description."""

LABEL = "pneumonia"
CAM_OUTPUT = "cam"
PARITY_IMAGES = 64
SYNTHETIC_NOTE = "SYNTHETIC chest radiographs, not patient data"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the model (stored in the manifest's training data summary)."""

    name: str = "chest"
    architecture: str = "seed_cnn"
    input_size: int = INPUT_SIZE
    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 3
    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    threshold_policy: str = "youden"
    version: str | None = None  # default: the UTC time the bundle is written
    monitor: str = "val_loss"  # early stopping and the kept epoch: val_loss, auroc, accuracy
    # Multiclass: the class that is no finding (e.g. "normal"), and the top-1 accuracy the
    # decided images must reach on validation (chooses the confident threshold; None: none).
    background_class: str | None = None
    confident_accuracy: float | None = None

    def fit_config(self) -> FitConfig:
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size,
                         learning_rate=self.learning_rate, patience=self.patience,
                         seed=self.seed, monitor=self.monitor)


@dataclass
class TrainResult:
    """What a run produced; ``model`` is the exported :class:`Scorer` (probabilities)."""

    bundle_dir: Path
    version: str
    metrics: dict[str, float]
    model_id: int | None
    manifest: Manifest | None = None
    seconds: float = 0.0
    model: nn.Module | None = field(default=None, repr=False)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds_per_epoch: float = 0.0
    resumed_from_epoch: int = 0


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


def stratified_split(
    labels: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices with the same positive fraction in both (images, no patients)."""
    train, val = [], []
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        cut = round(len(members) * val_fraction)
        val.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def draft_manifest(config: TrainConfig, labels: list[str] | None = None,
                   task: str = "binary") -> Manifest:
    """The manifest before training: its input and preprocessing spec are what the data is
    prepared with, so training and serving see the same tensors."""
    labels = labels or [LABEL]
    return Manifest(
        name=config.name, version="unversioned", task=task,  # type: ignore[arg-type]
        architecture=config.architecture,
        input=InputSpec(height=config.input_size, width=config.input_size),
        preprocessing=PreprocessSpec(), labels=labels, thresholds={k: 0.5 for k in labels},
    )


def train_cache_dir(settings: Settings) -> Path:
    """Where prepared training images are cached (``LIGHTBOX_TRAIN_CACHE``)."""
    return settings.train_cache or settings.data_path / "cache" / "prepared"


def load_training_data(
    settings: Settings, config: TrainConfig, *, data: Path | None = None,
    labels_csv: Path | None = None, synthetic_images: int = 600,
    progress: Progress | None = None,
) -> LabelledSet:
    """A DICOM folder (RSNA layout, labels CSV or class folders), or SYNTHETIC images."""
    draft = draft_manifest(config)
    if data is None:
        return synthetic_set(synthetic_images, draft, seed=config.seed)
    source = open_source(data, labels_csv)
    return load_source(source, draft, train_cache_dir(settings), progress)


def new_bundle_dir(models_dir: Path, name: str, version: str | None = None) -> tuple[str, Path]:
    """Claim ``models_dir/name/<version or UTC timestamp>[-N]``; mkdir is the lock, so versions
    are unique."""
    stamp = version or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (models_dir / name).mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        version = stamp if n == 1 else f"{stamp}-{n}"
        try:
            (models_dir / name / version).mkdir()
        except FileExistsError:
            continue
        return version, models_dir / name / version
    raise FileExistsError(f"no free version for {name} at {stamp}")


def _register(settings: Settings, bundle_dir: Path, promote: bool) -> int:
    with session_scope(settings.sqlalchemy_url) as session:
        return register_bundle(session, bundle_dir, promote=promote).id


def _evaluate(scores: np.ndarray, y: np.ndarray, labels: list[str], task: str,
              policy: str) -> tuple[dict[str, float], dict[str, float], dict[str, list]]:
    """(metrics, thresholds, confusion matrices) on validation: one threshold per label.

    Multiclass metrics are named for what they are: ``top1_accuracy`` (arg-max class right)
    and ``macro_ovr_*`` (each class one-vs-rest at its own threshold, averaged over classes);
    binary and multilabel keep ``sensitivity``/``specificity`` (mean over labels)."""
    thresholds, metrics, matrices = {}, {}, {}
    sens, spec = [], []
    for column, label in enumerate(labels):
        truth = y[:, column]
        if truth.min() == truth.max():
            thresholds[label] = 0.5  # nothing to choose from: one class only in validation
            continue
        threshold, s, p = choose_threshold(scores[:, column], truth, policy)
        thresholds[label], matrices[label] = threshold, confusion(scores[:, column], truth,
                                                                   threshold)
        sens.append(s)
        spec.append(p)
        if len(labels) > 1:
            prefix = "ovr_" if task == "multiclass" else ""
            metrics.update({f"{prefix}auroc_{label}": auroc(scores[:, column], truth),
                            f"{prefix}sensitivity_{label}": s,
                            f"{prefix}specificity_{label}": p})
    if sens:
        prefix = "macro_ovr_" if task == "multiclass" else ""
        metrics.update({f"{prefix}sensitivity": float(np.mean(sens)),
                        f"{prefix}specificity": float(np.mean(spec))})
    if len(labels) == 1:
        metrics["threshold"] = thresholds[labels[0]]
    if task == "multiclass":
        matrices["__classes__"] = multiclass_confusion(scores, y)
        metrics["top1_accuracy"] = float((scores.argmax(1) == y.argmax(1)).mean())
        metrics["macro_ovr_auroc"] = mean_auroc(scores, y)
    return metrics, thresholds, matrices


def confident_threshold(scores: np.ndarray, y: np.ndarray, target: float) -> float:
    """The lowest top probability at which the images decided (top probability ``>=`` it)
    reach ``target`` top-1 accuracy on validation: as many decided as the target allows. When
    no cut reaches it, the highest top probability (almost everything indeterminate)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"confident accuracy must be in (0, 1], got {target}")
    top = scores.max(1)
    right = scores.argmax(1) == y.argmax(1)
    order = np.argsort(-top, kind="stable")
    running = np.cumsum(right[order]) / np.arange(1, len(order) + 1)
    reached = np.flatnonzero(running >= target - 1e-12)
    return float(top[order][reached[-1]] if len(reached) else top.max())


def decided_metrics(scores: np.ndarray, y: np.ndarray, threshold: float | None,
                    prefix: str = "") -> dict[str, float]:
    """Top-1 accuracy, the indeterminate rate and accuracy on the decided images."""
    right = scores.argmax(1) == y.argmax(1)
    decided = scores.max(1) >= (threshold if threshold is not None else -1.0)
    metrics = {f"{prefix}top1_accuracy": float(right.mean()),
               f"{prefix}indeterminate_rate": float(1.0 - decided.mean())}
    if decided.any():  # no NaN in a manifest: JSON has none
        metrics[f"{prefix}decided_accuracy"] = float(right[decided].mean())
    return metrics


def _with_features(draft: Manifest, data: LabelledSet) -> Manifest:
    """A metadata model's manifest: the header encoding fitted on its data, and an input of
    (width, 1, 1) so runtimes and batchers treat the vector like any tensor."""
    features = data.summary.get("features")
    if not features:
        return draft
    specs = [FeatureSpec.model_validate(f) for f in features]  # type: ignore[union-attr,attr-defined]
    width = sum(spec.width for spec in specs)
    fusion = data.summary.get("fuse_with")
    fuse_with = None
    if isinstance(fusion, dict):  # a late-fusion head: image scores after the header values
        fuse_with = FusionSpec(model=str(fusion["model"]), version=str(fusion["version"]),
                               scores=list(fusion["scores"]))  # type: ignore[call-overload]
        width += fuse_with.width
    return draft.model_copy(update={
        "kind": "tabular", "features": specs, "fuse_with": fuse_with,
        "input": InputSpec(name="features", channels=width, height=1, width=1)})


def train_model(
    settings: Settings, data: LabelledSet, config: TrainConfig, *, register: bool = True,
    promote: bool = True, resume: bool = False, checkpoint_dir: Path | None = None,
    progress: Progress | None = None, keep_checkpoint: bool = False,
) -> TrainResult:
    """Train ``config.architecture`` on ``data`` and write a verified bundle under
    ``settings.models_dir/name/<version>``; register it (and promote it) when asked. The
    database must already be migrated. With ``resume``, an interrupted run of the same
    configuration and data continues from its last epoch checkpoint."""
    progress = progress or _no_progress
    started = time.perf_counter()
    split = patient_split(data.patients, data.y, val_fraction=config.val_fraction,
                          test_fraction=config.test_fraction, seed=config.seed + 1)
    train, val, test = (data.subset(i) for i in (split.train, split.validation, split.test))
    draft = _with_features(draft_manifest(config, data.labels, data.task), data)
    checkpoint_dir = checkpoint_dir or settings.data_path / "runs" / config.name
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    digest = run_digest(config.fit_config(), config.architecture, data.task, data.x, data.y)
    checkpoint = checkpoint_dir / f"checkpoint-{digest}.pt"
    with deterministic_torch(config.seed) as generator:
        network = build_network(config.architecture, len(data.labels), config.input_size,
                                draft.input.channels)
        fit_started = time.perf_counter()
        fitted = fit(network, data.task, train.x, train.y, val.x, val.y, config.fit_config(),
                     generator=generator, digest=digest, checkpoint=checkpoint, resume=resume,
                     progress=progress)
        epochs_run = max(1, len(fitted.history) - fitted.resumed_from_epoch)
        seconds_per_epoch = (time.perf_counter() - fit_started) / epochs_run
        scores = probabilities(network, data.task, val.x)
        metrics, thresholds, matrices = _evaluate(scores, val.y, data.labels, data.task,
                                                  config.threshold_policy)
        metrics = {**fitted.best_metrics, **metrics, "epochs": float(config.epochs),
                   "epochs_run": float(len(fitted.history))}
        confident = None
        if data.task == "multiclass":
            if config.background_class is not None and \
                    config.background_class not in data.labels:
                raise ValueError(f"background class {config.background_class!r} is not one of "
                                 f"the classes {data.labels}")
            if config.confident_accuracy is not None:
                confident = confident_threshold(scores, val.y, config.confident_accuracy)
            metrics.update(decided_metrics(scores, val.y, confident))
        if len(test):
            test_scores = probabilities(network, data.task, test.x)
            metrics["test_auroc"] = mean_auroc(test_scores, test.y)
            if data.task == "multiclass":
                metrics.update(decided_metrics(test_scores, test.y, confident, "test_"))
            else:
                metrics["test_accuracy"] = float(np.mean([
                    ((test_scores[:, c] >= thresholds[label]) == (test.y[:, c] > 0.5)).mean()
                    for c, label in enumerate(data.labels)]))
        progress("exporting ONNX", 0, 1)
        version, bundle_dir = new_bundle_dir(settings.models_dir, config.name, config.version)
        try:
            title = f"{config.name} {version} ({config.architecture})"
            roc_png(bundle_dir / ROC_PNG, scores, val.y, data.labels, thresholds,
                    f"validation ROC, {title}")
            learning_png(bundle_dir / LEARNING_PNG, fitted.history, title)
            plots = [ROC_PNG, LEARNING_PNG]
            if data.task == "multiclass":
                confusion_png(bundle_dir / CONFUSION_PNG, matrices["__classes__"], data.labels,
                              f"validation confusion, {title}")
                plots.append(CONFUSION_PNG)
            scorer = Scorer(network, data.task)
            positives = int((data.y[:, 0] > 0.5).sum()) if data.task == "binary" else None
            manifest = draft.model_copy(update={
                "version": version,
                "cam_output": CAM_OUTPUT if has_cam(network) else None,
                "thresholds": thresholds,
                "threshold_policy": config.threshold_policy,
                "confusion": matrices,
                "metrics": metrics,
                "plots": plots,
                "monitor": config.monitor,
                "background_class": config.background_class,
                "confident_threshold": confident,
                "training_data": {
                    **{k: v for k, v in data.summary.items()
                       if k not in ("cache", "features", "headers", "paths")},  # no header values
                    "source": data.summary.get("kind"), "positives": positives,
                    "train_images": len(train), "validation_images": len(val),
                    "test_images": len(test),
                    "split": {"by": "patient", "stratified": True, "seed": config.seed + 1,
                              "val_fraction": config.val_fraction,
                              "test_fraction": config.test_fraction},
                    "balance": balance_report(data.y, data.patients, data.labels, split),
                    "config": asdict(config),
                    "seconds_per_epoch": round(seconds_per_epoch, 3),
                    **({"note": SYNTHETIC_NOTE} if data.summary.get("kind") == "synthetic"
                       else {}),
                },
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            })
            manifest = write_bundle(scorer, manifest, bundle_dir, val.x[:PARITY_IMAGES])
        except BaseException:
            shutil.rmtree(bundle_dir, ignore_errors=True)  # never leave a half-written bundle
            raise
    progress("exporting ONNX", 1, 1)
    if not keep_checkpoint:
        checkpoint.unlink(missing_ok=True)  # the bundle is the result; resume is for crashes
    model_id = _register(settings, bundle_dir, promote) if register else None
    return TrainResult(bundle_dir=bundle_dir, version=version, metrics=dict(manifest.metrics),
                       model_id=model_id, manifest=manifest,
                       seconds=time.perf_counter() - started, model=scorer,
                       history=fitted.history, seconds_per_epoch=seconds_per_epoch,
                       resumed_from_epoch=fitted.resumed_from_epoch)


def train_seed_cnn(
    settings: Settings, *, name: str = "chest", images: int = 600, epochs: int = 4,
    batch_size: int = 32, seed: int = 0, promote: bool = True, register: bool = True,
    progress: Progress | None = None, architecture: str = "seed_cnn",
) -> TrainResult:
    """Train on ``images`` SYNTHETIC radiographs (demo and test fixtures) and write, register
    and (with ``promote``) promote the bundle."""
    progress = progress or _no_progress
    config = TrainConfig(name=name, architecture=architecture, epochs=epochs,
                         batch_size=batch_size, seed=seed, patience=0)
    progress("synthetic data", 0, 1)
    data = load_training_data(settings, config, synthetic_images=images)
    progress("synthetic data", 1, 1)
    return train_model(settings, data, config, register=register, promote=promote,
                       progress=progress)
