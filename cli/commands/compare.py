"""`lightbox models compare`: a shadow version against production on real traffic.

Agreement is on the decision a reader would see: the predicted class (and indeterminate) for
multiclass models, present/absent per label otherwise. Score correlation is Pearson's r over
the paired scores (multiclass: every class probability). The plot is production score against
shadow score, disagreements marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _decision(row: dict[str, Any], prefix: str = "") -> str:
    if row[f"{prefix}predicted_class"] is not None:
        return "indeterminate" if row[f"{prefix}indeterminate"] else \
            str(row[f"{prefix}predicted_class"])
    return "present" if row[f"{prefix}positive"] else "absent"


def _scores(row: dict[str, Any]) -> list[tuple[float, float]]:
    a, b = row["distribution"], row["shadow_distribution"]
    if isinstance(a, dict) and isinstance(b, dict):
        return [(float(a[k]), float(b[k])) for k in a if k in b]
    return [(float(row["score"]), float(row["shadow_score"]))]


def summarise(pairs: list[dict[str, Any]], limit: int = 50) -> dict[str, Any]:
    """Agreement, correlation and the first ``limit`` disagreements (UIDs only)."""
    if not pairs:
        return {"pairs": 0, "agreement": None, "score_correlation": None, "disagreements": []}
    agree = [_decision(r) == _decision(r, "shadow_") for r in pairs]
    points = np.asarray([p for r in pairs for p in _scores(r)], np.float64)
    correlation = None
    if len(points) > 1 and points[:, 0].std() > 0 and points[:, 1].std() > 0:
        correlation = round(float(np.corrcoef(points[:, 0], points[:, 1])[0, 1]), 6)
    disagreements = [
        {"study_instance_uid": r["study_instance_uid"], "sop_instance_uid": r["sop_instance_uid"],
         "label": r["label"], "production": _decision(r), "shadow": _decision(r, "shadow_"),
         "production_score": round(float(r["score"]), 6),
         "shadow_score": round(float(r["shadow_score"]), 6)}
        for r, same in zip(pairs, agree, strict=True) if not same]
    return {"pairs": len(pairs), "jobs": len({r["job_id"] for r in pairs}),
            "production_version": pairs[0]["production_version"],
            "shadow_version": pairs[0]["shadow_version"],
            "agreement": round(float(np.mean(agree)), 6), "score_correlation": correlation,
            "disagreements_total": len(disagreements), "disagreements": disagreements[:limit]}


def plot(pairs: list[dict[str, Any]], summary: dict[str, Any], path: Path, name: str) -> Path:
    """Production score (x) against shadow score (y); disagreements in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for row in pairs:
        same = _decision(row) == _decision(row, "shadow_")
        xs, ys = zip(*_scores(row), strict=True)
        ax.plot(xs, ys, "o", ms=4, alpha=0.6, color="C0" if same else "C3")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    r = summary.get("score_correlation")
    ax.set(xlabel=f"production {summary.get('production_version')} score",
           ylabel=f"shadow {summary.get('shadow_version')} score", xlim=(0, 1), ylim=(0, 1),
           title=f"{name}: agreement {summary.get('agreement')}, r "
                 f"{'n/a' if r is None else f'{r:.3f}'} ({summary.get('pairs')} pairs)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
