"""Score a candidate and the production version on the same images, for `lightbox models
promote` (and `lightbox models compare`'s offline half).

The default evaluation set is the candidate's own held-out set: its training source re-opened
from the manifest and split again with the recorded seed and fractions (the test part, or the
validation part when the run held out no test set). A named folder (``--eval-data``) is used
whole. Each model reads the images through its own preprocessing and runs in ONNX Runtime, as
a worker would run it. The metric: top-1 accuracy for multiclass models, mean AUROC otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightbox.errors import ConfigurationError
from lightbox.manifest import Manifest, load_manifest
from lightbox.settings import Settings
from trainer.datasets import LabelledSet, load_source, open_source, source_from_summary
from trainer.export import onnx_scores
from trainer.metrics import mean_auroc
from trainer.splits import patient_split
from trainer.synthetic_dataset import synthetic_set


def metric_name(manifest: Manifest) -> str:
    return "top1_accuracy" if manifest.task == "multiclass" else "auroc"


def score(manifest: Manifest, scores: np.ndarray, y: np.ndarray) -> float:
    if manifest.task == "multiclass":
        return float((scores.argmax(1) == y.argmax(1)).mean())
    return mean_auroc(scores, y)


def _load(settings: Settings, training: Manifest, reader: Manifest, data: Path | None,
          labels_csv: Path | None) -> LabelledSet:
    """The evaluation images prepared as ``reader`` expects them."""
    from trainer.train import train_cache_dir

    summary = training.training_data
    if reader.kind == "tabular":
        return _load_headers(training, reader, data, labels_csv)
    if data is not None:
        return load_source(open_source(data, labels_csv), reader, train_cache_dir(settings))
    if summary.get("kind") == "synthetic":
        return synthetic_set(int(summary["images"]), reader, seed=int(summary["seed"]),  # type: ignore[call-overload]
                             opacity_scale=float(summary.get("opacity_scale", 1.0)))  # type: ignore[arg-type]
    return load_source(source_from_summary(summary), reader, train_cache_dir(settings))


def _load_headers(training: Manifest, reader: Manifest, data: Path | None,
                  labels_csv: Path | None) -> LabelledSet:
    """A metadata model's evaluation set, encoded with ``reader``'s own fitted encoding."""
    from lightbox.tabular import encode
    from trainer.tabular import csv_tabular_set, synthetic_tabular_set

    keywords = [f.keyword for f in reader.features]
    summary = training.training_data
    if data is not None:
        if labels_csv is None:
            raise ConfigurationError("a metadata model's --eval-data needs --labels-csv")
        fitted = csv_tabular_set(data, labels_csv, keywords)
    elif summary.get("generator") == "view_headers":
        fitted = synthetic_tabular_set(int(summary["images"]), keywords,  # type: ignore[call-overload]
                                       seed=int(summary["seed"]))  # type: ignore[call-overload]
    else:
        fitted = csv_tabular_set(Path(str(summary["root"])), Path(str(summary["labels_csv"])),
                                 keywords)
    headers = fitted.summary["headers"]
    x = np.stack([encode(h, reader.features) for h in headers])[:, :, None, None]  # type: ignore[union-attr,attr-defined]
    if reader.fuse_with is not None:
        x = _with_image_scores(reader, x, fitted.summary.get("paths"))
    return LabelledSet(x.astype(np.float32), fitted.y, fitted.patients, fitted.labels,
                       fitted.task, {})


def _with_image_scores(reader: Manifest, x: np.ndarray, paths: object) -> np.ndarray:
    """A fusion head's inputs: the encoded headers and its image model's scores on the same
    files, from the image bundle it was trained with (recorded in its training summary)."""
    from trainer.tabular import image_model_scores

    fusion = reader.training_data.get("fuse_with")
    bundle = fusion.get("bundle") if isinstance(fusion, dict) else None
    if not isinstance(paths, list) or not bundle or not Path(str(bundle)).is_dir():
        raise ConfigurationError(f"{reader.name} {reader.version} is a fusion head: comparing "
                                 "needs DICOM files (--eval-data, --labels-csv) and its image "
                                 "model's bundle")
    _, scores = image_model_scores(Path(str(bundle)), [str(p) for p in paths])
    return np.concatenate([x[:, :, 0, 0], scores], axis=1)[:, :, None, None]


def _heldout(candidate: Manifest, data: LabelledSet) -> tuple[np.ndarray, str]:
    split_info = candidate.training_data.get("split")
    if not isinstance(split_info, dict):
        raise ConfigurationError(f"{candidate.name} {candidate.version} records no split: name "
                                 "an evaluation set with --eval-data")
    split = patient_split(data.patients, data.y, val_fraction=float(split_info["val_fraction"]),
                          test_fraction=float(split_info["test_fraction"]),
                          seed=int(split_info["seed"]))
    if len(split.test):
        return split.test, f"held-out test set of {candidate.version} ({len(split.test)} images)"
    return split.validation, (f"validation set of {candidate.version} "
                              f"({len(split.validation)} images; no test set was held out)")


def compare(settings: Settings, candidate_bundle: Path, production_bundle: Path, *,
            data: Path | None = None, labels_csv: Path | None = None) -> dict[str, object]:
    """Both models' metric on the same images: ``metric``, ``candidate``, ``production``,
    ``production_version``, ``evaluation`` (what the images were), ``images``, ``comparable``
    (False when the label sets or tasks differ: then no number decides)."""
    candidate = load_manifest(candidate_bundle, verify=True)
    production = load_manifest(production_bundle, verify=True)
    result: dict[str, object] = {"metric": metric_name(candidate),
                                 "production_version": production.version,
                                 "candidate_version": candidate.version}
    if (candidate.task, candidate.labels) != (production.task, production.labels):
        return {**result, "comparable": False, "candidate": None, "production": None,
                "evaluation": f"none: tasks/labels differ ({candidate.task} {candidate.labels} "
                              f"vs {production.task} {production.labels})"}
    mine = _load(settings, candidate, candidate, data, labels_csv)
    theirs = _load(settings, candidate, production, data, labels_csv)
    if len(mine) != len(theirs):
        raise ConfigurationError("the evaluation set decodes differently for the two models")
    if data is None:
        index, description = _heldout(candidate, mine)
    else:
        index, description = np.arange(len(mine)), f"evaluation set {data.name} ({len(mine)} images)"
    y = mine.y[index]
    a = score(candidate, onnx_scores(candidate_bundle / "model.onnx", mine.x[index]), y)
    b = score(production, onnx_scores(production_bundle / "model.onnx", theirs.x[index]), y)
    return {**result, "comparable": True, "candidate": round(a, 6), "production": round(b, 6),
            "evaluation": description, "images": len(index)}
