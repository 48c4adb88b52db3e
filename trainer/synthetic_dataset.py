"""A labelled SYNTHETIC training set (not patient data), preprocessed by the worker's own code.

Each image travels the path a real one does: display image → 12-bit stored values (randomly
MONOCHROME1 or MONOCHROME2) → an in-memory DICOM CR object → :func:`lightbox.pixels.decode_frame`
→ :func:`lightbox.pixels.to_display` → :func:`lightbox.preprocess.prepare`. Training on anything
else would let training and serving drift apart silently.
"""

from __future__ import annotations

import csv
import uuid
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from lightbox.manifest import Manifest
from lightbox.pixels import decode_frame, to_display
from lightbox.preprocess import prepare
from lightbox.synthetic import SYNTHETIC_NOTE, chest_image, cr_dataset, to_stored, write_study
from trainer.datasets import RSNA_LABELS_CSV, LabelledSet, hash_patient

SOURCE_SIZE = 128


def synthetic_example(rng: np.random.Generator, label: int, manifest: Manifest,
                      opacity_scale: float = 1.0) -> np.ndarray:
    """One SYNTHETIC image with ``label`` as the model's input (C, H, W) float32."""
    monochrome1 = bool(rng.integers(0, 2))
    stored = to_stored(chest_image(rng, size=SOURCE_SIZE, opacity=bool(label),
                                   opacity_scale=opacity_scale), monochrome1)
    ds = cr_dataset(
        stored, study_uid=generate_uid(), series_uid=generate_uid(), monochrome1=monochrome1,
        label=label, patient_id="SYNTRAIN",
    )
    display = to_display(decode_frame(ds), ds, manifest.preprocessing)
    return prepare(display, manifest)


def synthetic_dataset(
    images: int, manifest: Manifest, seed: int = 0, opacity_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``images`` SYNTHETIC examples, half positive (opacity), in shuffled order.

    Returns X (N, C, H, W) float32 and y (N,) float32. The same seed gives the same arrays.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(images, np.float32)
    labels[: images // 2] = 1.0
    rng.shuffle(labels)
    x = np.stack([synthetic_example(rng, int(label), manifest, opacity_scale)
                  for label in labels])
    return x.astype(np.float32, copy=False), labels


def synthetic_set(images: int, manifest: Manifest, seed: int = 0,
                  opacity_scale: float = 1.0) -> LabelledSet:
    """:func:`synthetic_dataset` as a :class:`LabelledSet`; every image is its own (synthetic)
    patient."""
    x, y = synthetic_dataset(images, manifest, seed=seed, opacity_scale=opacity_scale)
    patients = np.asarray([hash_patient(f"synthetic-{seed}-{i}") for i in range(images)])
    summary = {"kind": "synthetic", "images": images, "seed": seed, "note": SYNTHETIC_NOTE,
               "opacity_scale": opacity_scale,
               "source_image_sizes": [f"{SOURCE_SIZE}x{SOURCE_SIZE}"]}
    return LabelledSet(x, y[:, None], patients, ["pneumonia"], "binary", summary)


def write_rsna_layout(
    out_dir: Path, patients: int, seed: int = 0, size: int = 96, positive_fraction: float = 0.4
) -> Path:
    """A SYNTHETIC dataset in the RSNA Pneumonia Detection Challenge layout.

    ``stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``) with one to three
    box rows for positive patients (as in RSNA) and one empty row for negatives, plus one
    ``<patientId>.dcm`` each. Returns ``out_dir``."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [("patientId", "x", "y", "width", "height", "Target")]
    for _ in range(patients):
        patient_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        label = int(rng.random() < positive_fraction)
        monochrome1 = bool(rng.integers(0, 2))
        stored = to_stored(chest_image(rng, size=size, opacity=bool(label)), monochrome1)
        ds = cr_dataset(stored, study_uid=generate_uid(), series_uid=generate_uid(),
                        monochrome1=monochrome1, label=label, patient_id=patient_id)
        ds.save_as(out_dir / f"{patient_id}.dcm", enforce_file_format=True)
        if label:
            for _ in range(int(rng.integers(1, 4))):
                x, y = rng.integers(0, 700, size=2)
                rows.append((patient_id, str(x), str(y), "200", "300", "1"))
        else:
            rows.append((patient_id, "", "", "", "", "0"))
    with (out_dir / RSNA_LABELS_CSV).open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return out_dir


def write_class_folders(
    out_dir: Path, per_class: dict[str, int], seed: int = 0, size: int = 96,
    patients_per_image: float = 0.5,
) -> Path:
    """SYNTHETIC images in one folder per class; classes containing "opacity" or "pneumonia"
    get opacities, classes containing "effusion" a fluid level. About ``patients_per_image`` patients per image, so that some patients
    have several images (the split must keep them together)."""
    rng = np.random.default_rng(seed)
    total = sum(per_class.values())
    pool = [f"SYNPAT{n:04d}" for n in range(max(1, int(total * patients_per_image)))]
    for name, count in per_class.items():
        opacity = any(word in name.lower() for word in ("opacity", "pneumonia"))
        effusion = "effusion" in name.lower()
        for _ in range(count):
            patient_id = pool[int(rng.integers(0, len(pool)))]
            study = write_study(out_dir / name, rng, label=int(opacity), size=size,
                                patient_id=patient_id, effusion=effusion)
            assert study.paths
    return out_dir
