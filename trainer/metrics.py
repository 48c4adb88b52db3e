"""Validation metrics and threshold choice, in numpy so they mean the same everywhere.

AUROC is the Mann-Whitney U statistic; thresholds are chosen on validation scores by a policy
stored in the manifest ("youden" or "sensitivity:0.90"), and a score ``>=`` its threshold is
positive, as the worker decides.
"""

from __future__ import annotations

import numpy as np


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


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, sensitivity, candidate thresholds), thresholds descending."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0.5
    candidates = np.unique(scores)[::-1]
    positive = scores[None, :] >= candidates[:, None]
    sensitivity = (positive & labels).sum(1) / max(1, labels.sum())
    fpr = (positive & ~labels).sum(1) / max(1, (~labels).sum())
    return np.r_[0.0, fpr], np.r_[0.0, sensitivity], candidates


def _margin_threshold(candidates: np.ndarray, best: int) -> float:
    """Halfway between the cut score and the next lower one: same split on validation, with a
    margin for new images."""
    lower = candidates[best + 1] if best + 1 < len(candidates) else 0.0
    return float((candidates[best] + lower) / 2.0)


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity) maximising sensitivity + specificity − 1."""
    fpr, sensitivity, candidates = roc_curve(scores, labels)
    sensitivity, specificity = sensitivity[1:], 1.0 - fpr[1:]
    best = int(np.argmax(sensitivity + specificity - 1.0))
    return _margin_threshold(candidates, best), float(sensitivity[best]), float(specificity[best])


def sensitivity_threshold(
    scores: np.ndarray, labels: np.ndarray, target: float
) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity): the highest threshold whose sensitivity reaches
    ``target`` (screening use: miss at most 1 − target of positives on validation)."""
    fpr, sensitivity, candidates = roc_curve(scores, labels)
    sensitivity, specificity = sensitivity[1:], 1.0 - fpr[1:]
    reached = np.flatnonzero(sensitivity >= target - 1e-12)
    best = int(reached[0]) if len(reached) else len(candidates) - 1
    return _margin_threshold(candidates, best), float(sensitivity[best]), float(specificity[best])


def choose_threshold(
    scores: np.ndarray, labels: np.ndarray, policy: str
) -> tuple[float, float, float]:
    """Apply a threshold policy: ``youden`` or ``sensitivity:<target in (0, 1]>``."""
    if policy == "youden":
        return youden_threshold(scores, labels)
    if policy.startswith("sensitivity:"):
        target = float(policy.split(":", 1)[1])
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
        return sensitivity_threshold(scores, labels, target)
    raise ValueError(f"unknown threshold policy {policy!r} (youden or sensitivity:0.90)")


def confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> list[list[int]]:
    """[[TN, FP], [FN, TP]] at ``threshold``."""
    predicted = np.asarray(scores).ravel() >= threshold
    truth = np.asarray(labels).ravel() > 0.5
    return [[int((~predicted & ~truth).sum()), int((predicted & ~truth).sum())],
            [int((~predicted & truth).sum()), int((predicted & truth).sum())]]


def multiclass_confusion(probabilities: np.ndarray, onehot: np.ndarray) -> list[list[int]]:
    """Rows: true class; columns: arg-max class."""
    n = onehot.shape[1]
    matrix = np.zeros((n, n), np.int64)
    np.add.at(matrix, (onehot.argmax(1), probabilities.argmax(1)), 1)
    return matrix.tolist()


def bce(scores: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(np.asarray(scores, np.float64).ravel(), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, np.float64).ravel()
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def mean_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Macro AUROC over label columns that have both classes (NaN when none has)."""
    values = [auroc(scores[:, i], labels[:, i]) for i in range(labels.shape[1])]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
