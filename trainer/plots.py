"""ROC and learning-curve PNGs for the bundle (matplotlib, Agg: no display on servers)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

from trainer.metrics import auroc, roc_curve  # noqa: E402

ROC_PNG = "roc.png"
LEARNING_PNG = "learning_curves.png"
CONFUSION_PNG = "confusion.png"


def roc_png(path: Path, scores: np.ndarray, y: np.ndarray, labels: list[str],
            thresholds: dict[str, float], title: str) -> Path:
    """One ROC curve per label on validation, with the chosen operating point marked."""
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for column, label in enumerate(labels):
        truth = y[:, column]
        if truth.min() == truth.max():
            continue
        fpr, tpr, _ = roc_curve(scores[:, column], truth)
        line = ax.plot(fpr, tpr, label=f"{label} (AUROC {auroc(scores[:, column], truth):.3f})")
        predicted = scores[:, column] >= thresholds[label]
        positives = truth > 0.5
        ax.plot([(predicted & ~positives).sum() / max(1, (~positives).sum())],
                [(predicted & positives).sum() / max(1, positives.sum())], "o",
                color=line[0].get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def learning_png(path: Path, history: list[dict[str, float]], title: str) -> Path:
    """Training and validation loss, and validation AUROC, per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4), dpi=100)
    left.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    left.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation loss")
    left.set(xlabel="epoch", ylabel="loss")
    left.legend()
    right.plot(epochs, [h["auroc"] for h in history], "o-", color="C2", label="AUROC")
    if all("accuracy" in h for h in history):
        right.plot(epochs, [h["accuracy"] for h in history], "o-", color="C3",
                   label="accuracy")
    right.set(xlabel="epoch", ylabel="validation", ylim=(0, 1.02))
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def confusion_png(path: Path, matrix: list[list[int]], labels: list[str], title: str) -> Path:
    """Multiclass confusion matrix on validation: rows the true class, columns the arg-max."""
    counts = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2), dpi=100)
    ax.imshow(counts, cmap="Blues")
    for (row, column), value in np.ndenumerate(counts):
        ax.text(column, row, str(value), ha="center", va="center",
                color="white" if value > counts.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted (arg-max)", ylabel="true class", title=title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
