"""A labelled SYNTHETIC training set (not patient data), preprocessed by the worker's own code.

Each image travels the path a real one does: display image → 12-bit stored values (randomly
MONOCHROME1 or MONOCHROME2) → an in-memory DICOM CR object → :func:`lightbox.pixels.decode_frame`
→ :func:`lightbox.pixels.to_display` → :func:`lightbox.preprocess.prepare`. Training on anything
else would let training and serving drift apart silently.
"""

from __future__ import annotations

import numpy as np
from pydicom.uid import generate_uid

from lightbox.manifest import Manifest
from lightbox.pixels import decode_frame, to_display
from lightbox.preprocess import prepare
from lightbox.synthetic import chest_image, cr_dataset, to_stored

SOURCE_SIZE = 128


def synthetic_example(rng: np.random.Generator, label: int, manifest: Manifest) -> np.ndarray:
    """One SYNTHETIC image with ``label`` as the model's input (C, H, W) float32."""
    monochrome1 = bool(rng.integers(0, 2))
    stored = to_stored(chest_image(rng, size=SOURCE_SIZE, opacity=bool(label)), monochrome1)
    ds = cr_dataset(
        stored, study_uid=generate_uid(), series_uid=generate_uid(), monochrome1=monochrome1,
        label=label, patient_id="SYNTRAIN",
    )
    display = to_display(decode_frame(ds), ds, manifest.preprocessing)
    return prepare(display, manifest)


def synthetic_dataset(
    images: int, manifest: Manifest, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``images`` SYNTHETIC examples, half positive (opacity), in shuffled order.

    Returns X (N, C, H, W) float32 and y (N,) float32. The same seed gives the same arrays.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(images, np.float32)
    labels[: images // 2] = 1.0
    rng.shuffle(labels)
    x = np.stack([synthetic_example(rng, int(label), manifest) for label in labels])
    return x.astype(np.float32, copy=False), labels
