"""The training loop: validation every epoch, early stopping, best epoch kept, resumable.

A checkpoint is written (atomically) after every epoch with the model, the optimizer, the
epoch, the random-number state and the early-stopping state, so ``resume`` continues exactly
where an interrupted run stopped: the resumed run ends with the same weights as one that was
never interrupted. A checkpoint from a different configuration or dataset is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightbox.errors import ConfigurationError
from trainer.metrics import bce, mean_auroc

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
TORCH_THREADS = 2
PRECISE_BN_IMAGES = 512


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 3  # epochs without a better monitored value before stopping; 0 = never
    # Large dense layers (the seed CNN's ~4M-weight Linear) can kill every ReLU on an early
    # Adam step without clipping (seen on some seeds).
    grad_clip: float = 1.0
    seed: int = 0
    # What early stopping watches and the kept epoch is best by: "val_loss" (default: AUROC
    # only ranks, so on small sets it peaks on a lucky early epoch while the model is still
    # learning), "auroc" or "accuracy" (validation).
    monitor: str = "val_loss"


@dataclass
class FitResult:
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from_epoch: int = 0


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


def probabilities(network: nn.Module, task: str, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Validation scores as the exported graph computes them (sigmoid or softmax)."""
    network.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            logits = network(torch.from_numpy(x[start : start + batch]))
            parts.append((torch.softmax(logits, 1) if task == "multiclass"
                           else torch.sigmoid(logits)).numpy())
    return np.concatenate(parts)


def _loss_fn(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if task == "multiclass":
        ce = nn.CrossEntropyLoss()
        return lambda logits, y: ce(logits, y.argmax(1))
    return nn.BCEWithLogitsLoss()


def validation_loss(scores: np.ndarray, y: np.ndarray, task: str) -> float:
    if task == "multiclass":
        picked = np.clip((scores * y).sum(1), 1e-7, 1.0)
        return float(-np.mean(np.log(picked)))
    return bce(scores, y)


MONITORS = ("val_loss", "auroc", "accuracy")


def accuracy(scores: np.ndarray, y: np.ndarray, task: str) -> float:
    """Top-1 accuracy (multiclass) or the mean per-label accuracy at 0.5."""
    if task == "multiclass":
        return float((scores.argmax(1) == y.argmax(1)).mean())
    return float(((scores >= 0.5) == (y > 0.5)).mean())


def monitor_key(metrics: dict[str, float], monitor: str) -> tuple[float, float]:
    """Larger is better; ties go to the lower validation loss (or higher AUROC)."""
    auroc = -1.0 if math.isnan(metrics["auroc"]) else metrics["auroc"]
    if monitor == "val_loss":
        return (-metrics["val_loss"], auroc)
    if monitor == "auroc":
        return (auroc, -metrics["val_loss"])
    if monitor == "accuracy":
        return (metrics["accuracy"], -metrics["val_loss"])
    raise ConfigurationError(f"unknown early-stopping monitor {monitor!r} "
                             f"(one of {', '.join(MONITORS)})")


def run_digest(config: FitConfig, architecture: str, task: str, x: np.ndarray,
               y: np.ndarray) -> str:
    """Identifies a run: a checkpoint only resumes the run it came from."""
    digest = hashlib.sha256(json.dumps([asdict(config), architecture, task, list(x.shape)],
                                       sort_keys=True).encode())
    digest.update(np.ascontiguousarray(y).tobytes())
    digest.update(np.ascontiguousarray(x[:: max(1, len(x) // 16)]).tobytes())
    return digest.hexdigest()[:16]


def precise_batchnorm(network: nn.Module, x: torch.Tensor, batch_size: int,
                      max_images: int = PRECISE_BN_IMAGES) -> None:
    """Recompute batch-norm running statistics over (up to ``max_images``) training images
    with the current weights ("precise BN").

    The running averages otherwise lag behind weights that change fast early in training, and
    an evaluated network then sees activations it never trained on (saturated scores on new
    images while validation looked fine). Uses the first images in a fixed order and no random
    numbers, so resuming stays exact. No-op for networks without batch norm (the seed CNN).
    """
    layers = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the passes below
    network.train()
    with torch.no_grad():
        for start in range(0, min(len(x), max_images), batch_size):
            if len(x[start : start + batch_size]) > 1:
                network(x[start : start + batch_size])
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum


def _save(path: Path, state: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def fit(
    network: nn.Module, task: str, x_train: np.ndarray, y_train: np.ndarray,
    x_val: np.ndarray, y_val: np.ndarray, config: FitConfig, *, generator: torch.Generator,
    digest: str, checkpoint: Path | None = None, resume: bool = False,
    progress: Progress | None = None,
) -> FitResult:
    """Adam on the task's loss; keeps (loads into ``network``) the epoch with the best
    ``config.monitor`` on validation (default: the lowest validation loss) and returns its
    metrics. Logs one line per epoch (losses, AUROC, accuracy, seconds) at INFO."""
    monitor_key({"auroc": 0.0, "val_loss": 0.0, "accuracy": 0.0}, config.monitor)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    loss_fn = _loss_fn(task)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    best_key: tuple[float, float] = (-math.inf, -math.inf)
    best_state: dict[str, torch.Tensor] = {k: v.clone() for k, v in network.state_dict().items()}
    result = FitResult(best_metrics={})
    stale, start_epoch = 0, 1
    if resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["digest"] != digest:
            raise ConfigurationError(
                f"checkpoint {checkpoint} belongs to another run (configuration or data "
                "changed); start without --resume or use another checkpoint folder")
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        best_key, best_state, stale = tuple(state["best_key"]), state["best_state"], state["stale"]
        result.history, result.best_metrics = state["history"], state["best_metrics"]
        result.resumed_from_epoch = int(state["epoch"])
        start_epoch = result.resumed_from_epoch + 1
        log.info("resuming from epoch %d of %s", state["epoch"], checkpoint.name)
        if state.get("stopped"):
            start_epoch = config.epochs + 1
            result.stopped_early = True
    batches = max(1, len(xt) // config.batch_size)
    for epoch in range(start_epoch, config.epochs + 1):
        epoch_started = time.perf_counter()
        network.train()
        order = torch.randperm(len(xt), generator=generator)
        losses = []
        for number, begin in enumerate(range(0, len(xt), config.batch_size), 1):
            batch = order[begin : begin + config.batch_size]
            if len(batch) < 2:
                continue  # batch norm cannot train on one image
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(network(xt[batch]), yt[batch])
            loss.backward()
            nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress:
                progress(f"epoch {epoch}/{config.epochs}", min(number, batches), batches)
        precise_batchnorm(network, xt, config.batch_size)
        scores = probabilities(network, task, x_val)
        metrics = {"epoch": float(epoch), "train_loss": float(np.mean(losses)),
                   "val_loss": validation_loss(scores, y_val, task),
                   "auroc": mean_auroc(scores, y_val),
                   "accuracy": accuracy(scores, y_val, task),
                   "seconds": round(time.perf_counter() - epoch_started, 3)}
        result.history.append(metrics)
        key = monitor_key(metrics, config.monitor)
        better = key > best_key
        if better:
            best_key, stale = key, 0
            best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
            result.best_metrics = {"auroc": metrics["auroc"], "val_loss": metrics["val_loss"],
                                   "best_epoch": float(epoch)}
        else:
            stale += 1
        log.info("epoch %d/%d: train loss %.4f, validation loss %.4f, AUROC %.4f, %s %.4f, "
                 "%.1f s%s", epoch, config.epochs, metrics["train_loss"], metrics["val_loss"],
                 metrics["auroc"], "top-1 accuracy" if task == "multiclass" else "accuracy",
                 metrics["accuracy"], metrics["seconds"],
                 f" (best {config.monitor} so far)" if better else "")
        stop = config.patience > 0 and stale >= config.patience
        if checkpoint is not None:
            _save(checkpoint, {
                "digest": digest, "epoch": epoch, "model": network.state_dict(),
                "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "best_key": list(best_key),
                "best_state": best_state, "stale": stale, "history": result.history,
                "best_metrics": result.best_metrics, "stopped": stop})
        if stop:
            result.stopped_early = True
            log.info("early stop after epoch %d: %s did not improve for %d epoch(s); keeping "
                     "epoch %d", epoch, config.monitor, config.patience,
                     int(result.best_metrics["best_epoch"]))
            break
    network.load_state_dict(best_state)
    network.eval()
    return result
