"""Train the seed pneumonia CNN on SYNTHETIC radiographs, export it and register it.

Everything is seeded (data, split, initialisation, batch order) and torch runs deterministic
algorithms on 2 threads, so the same seed gives the same weights, metrics and ``model.onnx``.
The checkpoint kept is the epoch with the best validation AUROC; the decision threshold is
Youden's J on the validation set (a score ``>=`` the threshold is positive).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from db.registry import register_bundle
from db.session import session_scope
from lightbox.manifest import InputSpec, Manifest, PreprocessSpec
from lightbox.settings import Settings
from trainer.export import torch_scores, write_bundle
from trainer.seed_cnn import INPUT_SIZE, SeedCNN
from trainer.synthetic_dataset import synthetic_dataset

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: "synthetic data" (0→1), "training" (epoch i of n), then
"exporting ONNX" (0→1). The stage doubles as a progress-bar description."""

LABEL = "pneumonia"
VAL_FRACTION = 0.2
LEARNING_RATE = 1e-3
# The first Linear has ~4M weights; without clipping an early Adam step can kill every ReLU and
# leave a constant output for the rest of the run (seen on some seeds).
GRAD_CLIP_NORM = 1.0
TORCH_THREADS = 2
SYNTHETIC_NOTE = "SYNTHETIC chest radiographs, not patient data"


@dataclass
class TrainResult:
    """What a run produced; ``model`` is the kept torch model, for parity checks by callers."""

    bundle_dir: Path
    version: str
    metrics: dict[str, float]
    model_id: int | None
    manifest: Manifest | None = None
    seconds: float = 0.0
    model: nn.Module | None = field(default=None, repr=False)


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


# --- metrics ---------------------------------------------------------------------------------


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic (ties get average ranks)."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0.5
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity) maximising sensitivity + specificity − 1.

    The threshold sits halfway between the cut score and the next lower score, so it gives the
    same split on validation but leaves a margin for new images.
    """
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0.5
    candidates = np.unique(scores)[::-1]  # descending
    positive = scores[None, :] >= candidates[:, None]
    sensitivity = (positive & labels).sum(1) / max(1, labels.sum())
    specificity = (~positive & ~labels).sum(1) / max(1, (~labels).sum())
    best = int(np.argmax(sensitivity + specificity - 1.0))
    lower = candidates[best + 1] if best + 1 < len(candidates) else 0.0
    threshold = float((candidates[best] + lower) / 2.0)
    return threshold, float(sensitivity[best]), float(specificity[best])


def bce(scores: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(np.asarray(scores, np.float64).ravel(), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, np.float64).ravel()
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# --- data and determinism --------------------------------------------------------------------


def stratified_split(
    labels: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices with the same positive fraction in both."""
    train, val = [], []
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        cut = round(len(members) * val_fraction)
        val.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


@contextmanager
def deterministic_torch(seed: int) -> Iterator[torch.Generator]:
    """Seed torch, force deterministic kernels on 2 threads; restore the global state after."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield torch.Generator().manual_seed(seed)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


# --- training --------------------------------------------------------------------------------


def _train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    batch_size: int, generator: torch.Generator,
) -> None:
    model.train()
    loss_fn = nn.BCELoss()
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x), batch_size):
        batch = order[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[batch]).squeeze(1), y[batch])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()


def fit(
    model: nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
    y_val: np.ndarray, *, epochs: int, batch_size: int, generator: torch.Generator,
    progress: Progress,
) -> dict[str, float]:
    """Adam + BCE (gradient norm clipped); keeps (loads into ``model``) the epoch with the best validation AUROC,
    ties broken by lower validation loss. Returns that epoch's validation metrics."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    best: tuple[float, float] = (-1.0, 0.0)
    best_state: dict[str, torch.Tensor] = {}
    best_metrics: dict[str, float] = {}
    for epoch in range(1, epochs + 1):
        _train_epoch(model, optimizer, xt, yt, batch_size, generator)
        scores = torch_scores(model, x_val)
        metrics = {"auroc": auroc(scores, y_val), "val_loss": bce(scores, y_val),
                   "best_epoch": float(epoch)}
        key = (metrics["auroc"], -metrics["val_loss"])
        if key > best:
            best, best_metrics = key, metrics
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        progress("training", epoch, epochs)
    model.load_state_dict(best_state)
    model.eval()
    return best_metrics


# --- bundle ----------------------------------------------------------------------------------


def new_bundle_dir(models_dir: Path, name: str) -> tuple[str, Path]:
    """Claim ``models_dir/name/<UTC timestamp>[-N]``; mkdir is the lock, so versions are unique."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (models_dir / name).mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        version = stamp if n == 1 else f"{stamp}-{n}"
        try:
            (models_dir / name / version).mkdir()
        except FileExistsError:
            continue
        return version, models_dir / name / version
    raise FileExistsError(f"no free version for {name} at {stamp}")


def _draft_manifest(name: str) -> Manifest:
    """The manifest before training: its preprocessing spec is the one the data is built with."""
    return Manifest(
        name=name, version="unversioned", task="binary", architecture="seed_cnn",
        input=InputSpec(height=INPUT_SIZE, width=INPUT_SIZE), preprocessing=PreprocessSpec(),
        labels=[LABEL], thresholds={LABEL: 0.5},
    )


def _register(settings: Settings, bundle_dir: Path, promote: bool) -> int:
    with session_scope(settings.sqlalchemy_url) as session:
        return register_bundle(session, bundle_dir, promote=promote).id


def train_seed_cnn(
    settings: Settings, *, name: str = "chest", images: int = 600, epochs: int = 4,
    batch_size: int = 32, seed: int = 0, promote: bool = True, register: bool = True,
    progress: Progress | None = None,
) -> TrainResult:
    """Train on ``images`` SYNTHETIC radiographs, write a verified bundle under
    ``settings.models_dir/name/<version>`` and (with ``register``) register it, promoting it to
    production with ``promote``. The database must already be migrated."""
    progress = progress or _no_progress
    started = time.perf_counter()
    draft = _draft_manifest(name)
    progress("synthetic data", 0, 1)
    x, y = synthetic_dataset(images, draft, seed=seed)
    train_idx, val_idx = stratified_split(y, VAL_FRACTION, np.random.default_rng(seed + 1))
    progress("synthetic data", 1, 1)
    with deterministic_torch(seed) as generator:
        model = SeedCNN()
        best = fit(model, x[train_idx], y[train_idx], x[val_idx], y[val_idx], epochs=epochs,
                   batch_size=batch_size, generator=generator, progress=progress)
        threshold, sensitivity, specificity = youden_threshold(
            torch_scores(model, x[val_idx]), y[val_idx])
        progress("exporting ONNX", 0, 1)
        version, bundle_dir = new_bundle_dir(settings.models_dir, name)
        manifest = draft.model_copy(update={
            "version": version,
            "thresholds": {LABEL: threshold},
            "metrics": {**best, "sensitivity": sensitivity, "specificity": specificity,
                        "threshold": threshold, "epochs": float(epochs)},
            "training_data": {
                "source": "synthetic", "images": int(images), "positives": int(y.sum()),
                "train_images": len(train_idx), "validation_images": len(val_idx),
                "seed": seed, "note": SYNTHETIC_NOTE,
            },
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        })
        try:
            manifest = write_bundle(model, manifest, bundle_dir, x[val_idx])
        except BaseException:
            shutil.rmtree(bundle_dir, ignore_errors=True)  # never leave a half-written bundle
            raise
    progress("exporting ONNX", 1, 1)
    model_id = _register(settings, bundle_dir, promote) if register else None
    return TrainResult(bundle_dir=bundle_dir, version=version, metrics=dict(manifest.metrics),
                       model_id=model_id, manifest=manifest,
                       seconds=time.perf_counter() - started, model=model)
