"""Model outputs → finding rows, by the manifest's task.

- ``binary``: one finding per image (score, threshold, positive).
- ``multilabel`` (sigmoid): one finding per label, each with its own threshold.
- ``multiclass`` (softmax): ONE row per image: ``label``/``predicted_class`` the arg-max class,
  ``score`` its probability, ``distribution`` every class's probability. ``indeterminate`` when
  the top probability is below the manifest's ``confident_threshold`` (stored as the row's
  threshold). ``positive`` ("present") only for a decided, non-background class: the
  background class (e.g. ``normal``) is never reported as a finding present.

Every row carries ``synthetic`` (the model was trained on SYNTHETIC data), ``shadow`` (written
by a shadow version: compared, never exported) and the ``model_id`` that wrote it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightbox.manifest import Manifest


def scores_of(manifest: Manifest, outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The score vector of one image (the manifest's output, else the first one)."""
    scores = outputs.get(manifest.output_name)
    if scores is None:
        scores = next(iter(outputs.values()))
    return np.asarray(scores, dtype=np.float32).reshape(-1)


def image_findings(manifest: Manifest, scores: np.ndarray) -> list[dict[str, Any]]:
    """The findings of one image (without job, image and model columns)."""
    if manifest.task == "multiclass":
        top = int(np.argmax(scores))
        label, probability = manifest.labels[top], float(scores[top])
        threshold = manifest.confident_threshold
        indeterminate = threshold is not None and probability < threshold
        return [{
            "label": label, "predicted_class": label, "score": probability,
            "threshold": float(threshold if threshold is not None else 0.0),
            "indeterminate": indeterminate,
            "positive": not indeterminate and label != manifest.background_class,
            "distribution": {k: round(float(v), 6)
                             for k, v in zip(manifest.labels, scores, strict=True)},
        }]
    rows = []
    for label, score in zip(manifest.labels, scores, strict=True):
        threshold = manifest.threshold_for(label)
        rows.append({"label": label, "predicted_class": None, "score": float(score),
                     "threshold": threshold, "indeterminate": False,
                     "positive": bool(score >= threshold), "distribution": None})
    return rows


def finding_rows(job_id: int, study_id: int, manifest: Manifest, model_id: int,
                 images: list[tuple[str, str]], outputs: list[dict[str, np.ndarray]], *,
                 shadow: bool = False) -> list[dict[str, Any]]:
    """Rows for the findings table; ``images`` are (series UID, SOP instance UID) pairs."""
    rows = []
    for (series_uid, sop_uid), output in zip(images, outputs, strict=True):
        for finding in image_findings(manifest, scores_of(manifest, output)):
            rows.append({"job_id": job_id, "study_id": study_id,
                         "series_instance_uid": series_uid, "sop_instance_uid": sop_uid,
                         "superseded": False, "shadow": shadow,
                         "synthetic": manifest.synthetic, "model_id": model_id, **finding})
    return rows
