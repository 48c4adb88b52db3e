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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from torch import nn

from lightbox.errors import ConfigurationError
from lightbox.synthetic import cr_dataset
from lightbox.tabular import encode, fit_features, read_header
from trainer.datasets import LabelledSet, csv_source, hash_patient

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
    that cannot be read are skipped and counted."""
    source = csv_source(root, labels_csv)
    headers, targets, patients, skipped = [], [], [], 0
    for number, item in enumerate(source.items):
        try:
            headers.append(read_header(item.path, keywords))
        except (OSError, ValueError, pydicom.errors.InvalidDicomError):
            skipped += 1
            continue
        targets.append(item.target)
        patients.append(item.patient or hash_patient(f"{labels_csv.name}-{number}"))
    return tabular_set(headers, np.asarray(targets), source.labels, source.task, keywords,
                       np.asarray(patients), {**source.describe, "images": len(headers),
                                              "skipped": skipped})
