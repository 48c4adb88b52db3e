"""Metadata (tabular) models: a small MLP on DICOM header values, the seeds' iris / Pima
networks for imaging queues.

Input: the header values named by ``--features`` (e.g. KVP, ExposureInuAs,
DistanceSourceToDetector, PatientAge, PatientSex, Manufacturer), encoded as fitted on the
training headers (:func:`lightbox.tabular.fit_features`: standardised numbers with a missing
indicator, one-hot categories with an "other or missing" column). The encoding goes into the
manifest, and the worker applies it to each file's header without decoding pixels.

The demonstration task needs no patient data to leave the DICOM: predicting the view (PA, AP,
LATERAL) from acquisition values, trained on SYNTHETIC header distributions
(:func:`synthetic_headers`), e.g. to flag a ViewPosition tag that disagrees.

A late-fusion head (:func:`fuse_image_scores`) also takes an image model's scores on the same
file as inputs: the image model runs through the shared preprocessing and ONNX Runtime, as in
the worker. Its demonstration (:func:`write_fusion_files`) is a SYNTHETIC task whose label
depends on both the header and the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from torch import nn

from lightbox.errors import ConfigurationError
from lightbox.manifest import Manifest, load_manifest
from lightbox.preprocess import prepare_file
from lightbox.synthetic import chest_image, cr_dataset, to_stored
from lightbox.tabular import encode, fit_features, read_header
from trainer.datasets import LabelledSet, csv_source, hash_patient
from trainer.export import onnx_scores

DEFAULT_FEATURES = ["KVP", "ExposureInuAs", "DistanceSourceToDetector", "PatientAge",
                    "PatientSex", "Manufacturer"]
VIEWS = ["AP", "LATERAL", "PA"]
SYNTHETIC_HEADERS_NOTE = "SYNTHETIC header values (view-dependent distributions), not patient data"
HIDDEN = 32

# (mean, sd) per view: portable AP films are taken closer, at lower kV, on older inpatients.
_NUMERIC = {
    "DistanceSourceToDetector": {"PA": (1800, 60), "AP": (1050, 120), "LATERAL": (1800, 60)},
    "KVP": {"PA": (120, 6), "AP": (88, 8), "LATERAL": (125, 6)},
    "ExposureInuAs": {"PA": (2500, 600), "AP": (2000, 500), "LATERAL": (7500, 1500)},
    "PatientAge": {"PA": (48, 16), "AP": (66, 14), "LATERAL": (48, 16)},
}
_PORTABLE_SHARE = {"PA": 0.15, "AP": 0.85, "LATERAL": 0.15}


def tabular_mlp(inputs: int, outputs: int, hidden: int = HIDDEN) -> nn.Module:
    """Flatten (N, inputs, 1, 1) → Linear → ReLU → Linear: logits (N, outputs)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(),
                         nn.Linear(hidden, outputs))


def synthetic_headers(count: int, seed: int = 0, missing: float = 0.1,
                      ) -> tuple[list[dict[str, object]], list[str]]:
    """SYNTHETIC header values and their views; each value is missing with ``missing``
    probability (as on real modalities that leave tags empty)."""
    rng = np.random.default_rng(seed)
    headers, views = [], []
    for _ in range(count):
        view = VIEWS[int(rng.integers(0, len(VIEWS)))]
        header: dict[str, object] = {}
        for keyword, by_view in _NUMERIC.items():
            mean, sd = by_view[view]
            value = max(1.0, rng.normal(mean, sd))
            if keyword == "PatientAge":
                header[keyword] = f"{int(min(value, 99)):03d}Y"
            elif keyword == "ExposureInuAs":  # IS: an integer string
                header[keyword] = int(round(value))
            else:
                header[keyword] = round(value, 1)
        header["PatientSex"] = "M" if rng.random() < 0.5 else "F"
        header["Manufacturer"] = ("PortaRad" if rng.random() < _PORTABLE_SHARE[view]
                                  else "WallStand")
        for keyword in list(header):
            if rng.random() < missing:
                header[keyword] = None
        headers.append(header)
        views.append(view)
    return headers, views


def write_header_files(out_dir: Path, count: int, seed: int = 0, missing: float = 0.1,
                       ) -> tuple[list[Path], list[str]]:
    """SYNTHETIC CR files carrying :func:`synthetic_headers` values (and a tiny image, so that
    they register like any CR); absent values are absent tags. Returns (paths, views)."""
    headers, views = synthetic_headers(count, seed, missing)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(seed + 1)
    for number, (header, view) in enumerate(zip(headers, views, strict=True), 1):
        stored = rng.integers(0, 4095, (16, 16)).astype(np.uint16)
        ds = cr_dataset(stored, study_uid=pydicom.uid.generate_uid(),
                        series_uid=pydicom.uid.generate_uid(), monochrome1=False, label=0,
                        patient_id=f"SYNHDR{number:04d}", view=view)
        _apply(ds, header)
        path = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, views


def _apply(ds: Dataset, header: dict[str, object]) -> None:
    for keyword, value in header.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def tabular_set(headers: list[dict[str, object]], targets: np.ndarray, labels: list[str],
                task: str, keywords: list[str], patients: np.ndarray,
                summary: dict[str, object]) -> LabelledSet:
    """Encode headers with an encoding fitted on them; the encoding rides in the summary
    (``features``) and becomes the manifest's."""
    if not headers:
        raise ConfigurationError("no headers to train a metadata model on")
    specs = fit_features(headers, keywords)
    x = np.stack([encode(h, specs) for h in headers])[:, :, None, None]
    return LabelledSet(x.astype(np.float32), targets.astype(np.float32), patients, labels, task,
                       {**summary, "features": [s.model_dump() for s in specs],
                        "feature_keywords": keywords, "headers": headers})


def synthetic_tabular_set(count: int, keywords: list[str] | None = None, seed: int = 0,
                          ) -> LabelledSet:
    """The view task on SYNTHETIC headers (marked synthetic in the manifest)."""
    headers, views = synthetic_headers(count, seed)
    targets = np.asarray([[float(v == c) for c in VIEWS] for v in views])
    patients = np.asarray([hash_patient(f"synthetic-header-{seed}-{i}") for i in range(count)])
    return tabular_set(headers, targets, list(VIEWS), "multiclass", keywords or DEFAULT_FEATURES,
                       patients, {"kind": "synthetic", "generator": "view_headers",
                                  "images": count, "seed": seed,
                                  "note": SYNTHETIC_HEADERS_NOTE})


def csv_tabular_set(root: Path, labels_csv: Path, keywords: list[str]) -> LabelledSet:
    """Files named in a labels CSV (as for image models); only their headers are read. Files
    that cannot be read are skipped and counted. The summary's ``paths`` (the files read, in
    order) are for a late-fusion head's image scores; they stay out of the manifest."""
    source = csv_source(root, labels_csv)
    headers, targets, patients, paths, skipped = [], [], [], [], 0
    for number, item in enumerate(source.items):
        try:
            headers.append(read_header(item.path, keywords))
        except (OSError, ValueError, pydicom.errors.InvalidDicomError):
            skipped += 1
            continue
        targets.append(item.target)
        paths.append(str(item.path))
        patients.append(item.patient or hash_patient(f"{labels_csv.name}-{number}"))
    return tabular_set(headers, np.asarray(targets), source.labels, source.task, keywords,
                       np.asarray(patients), {**source.describe, "images": len(headers),
                                              "skipped": skipped, "paths": paths})


def image_model_scores(image_bundle: Path, paths: list[str]) -> tuple[Manifest, np.ndarray]:
    """An image model's scores on files, as the worker computes them: the shared
    preprocessing (:func:`lightbox.preprocess.prepare_file`) and ONNX Runtime on the bundle's
    verified ``model.onnx``. Returns (its manifest, scores (N, labels))."""
    manifest = load_manifest(image_bundle, verify=True)
    if manifest.kind != "image":
        raise ConfigurationError(f"{manifest.name} {manifest.version} is a {manifest.kind} "
                                 "model: a fusion head takes an image model's scores")
    scores = []
    for start in range(0, len(paths), 64):
        batch = np.stack([prepare_file(p, manifest) for p in paths[start:start + 64]])
        scores.append(onnx_scores(image_bundle / "model.onnx", batch))
    return manifest, np.concatenate(scores).astype(np.float32).reshape(len(paths), -1)


def fuse_image_scores(data: LabelledSet, image_bundle: Path) -> LabelledSet:
    """A metadata set with an image model's scores on the same files appended to each input
    vector (a late-fusion head); the image model is recorded by name and version."""
    paths = data.summary.get("paths")
    if not isinstance(paths, list) or len(paths) != len(data):
        raise ConfigurationError("a fusion head needs DICOM files with images: train it with "
                                 "--data and --labels-csv")
    manifest, scores = image_model_scores(image_bundle, paths)
    x = np.concatenate([data.x[:, :, 0, 0], scores], axis=1)[:, :, None, None]
    fusion = {"model": manifest.name, "version": manifest.version,
              "scores": list(manifest.labels), "bundle": str(image_bundle)}
    # A head on a SYNTHETIC image model's scores is no better than its input: it says so too.
    synthetic = {"synthetic": True, "synthetic_because": f"image model {manifest.name} "
                 f"{manifest.version} was trained on SYNTHETIC data"} if manifest.synthetic \
        else {}
    return LabelledSet(x.astype(np.float32), data.y, data.patients, data.labels, data.task,
                       {**data.summary, "fuse_with": fusion, **synthetic})


FUSION_LABEL = "admit"
FUSION_AGE = 55.0


def write_fusion_files(out_dir: Path, count: int, seed: int = 0, missing: float = 0.05,
                       ) -> Path:
    """SYNTHETIC CR files for a task that needs both the header and the image: ``admit`` is 1
    when the image shows an opacity AND the patient is at least 55 (an invented triage rule,
    not clinical advice). Headers as :func:`synthetic_headers`, images as the synthetic seed
    model's (128 px radiographs, half with an opacity). Writes ``labels.csv`` (file, patient,
    admit) and returns its path."""
    headers, views = synthetic_headers(count, seed, missing=0.0)
    rng = np.random.default_rng(seed + 7)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = ["file,patient,admit"]
    for number, (header, view) in enumerate(zip(headers, views, strict=True), 1):
        opacity = bool(rng.random() < 0.5)
        age = float(str(header["PatientAge"])[:3])
        label = int(opacity and age >= FUSION_AGE)
        monochrome1 = bool(rng.integers(0, 2))
        stored = to_stored(chest_image(rng, size=128, opacity=opacity), monochrome1)
        patient = f"SYNFUSE{seed:03d}{number:05d}"
        ds = cr_dataset(stored, study_uid=pydicom.uid.generate_uid(),
                        series_uid=pydicom.uid.generate_uid(), monochrome1=monochrome1,
                        label=label, patient_id=patient, view=view)
        _apply(ds, {k: (None if rng.random() < missing else v) for k, v in header.items()})
        name = f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(out_dir / name, enforce_file_format=True)
        rows.append(f"{name},{patient},{label}")
    labels_csv = out_dir / "labels.csv"
    labels_csv.write_text("\n".join(rows) + "\n")
    return labels_csv
