"""DICOM header values → the input vector of a metadata (tabular) model.

The encoding is the manifest's (:class:`lightbox.manifest.FeatureSpec`), fitted on training
data by the trainer and applied here by both the trainer and the worker, so a model sees the
same vector in both. Values never leave this module: they are not logged, stored or put in
exceptions (PatientAge and PatientSex are demographic data; only findings are stored).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from lightbox.manifest import FeatureSpec, Manifest

Header = Mapping[str, object]


def age_years(value: object) -> float | None:
    """A DICOM AS value ("045Y", "006M", "012W", "003D") in years."""
    text = str(value).strip().upper()
    if len(text) < 2 or not text[:-1].isdigit():
        return None
    per_year = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}.get(text[-1])
    return None if per_year is None else int(text[:-1]) / per_year


def numeric(keyword: str, value: object) -> float | None:
    """A header value as a number, or None when absent or unreadable."""
    if value is None or value == "":
        return None
    if keyword == "PatientAge":
        return age_years(value)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def category(value: object) -> str | None:
    text = str(value).strip().upper() if value is not None else ""
    return text or None


def header_values(ds: Dataset, keywords: list[str]) -> dict[str, object]:
    """The named top-level header values of ``ds`` (None where absent or empty), read from
    the raw bytes where still raw: pydicom's value validation would warn and log a bad value
    with the value in the message, and header values must not reach logs."""
    values: dict[str, object] = {}
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        item = ds.get_item(tag) if tag is not None else None
        value = None if item is None else item.value
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace").split("\\")[0].strip(" \x00")
        values[keyword] = None if value is None or value == "" else value
    return values


def read_header(path: Path | str, keywords: list[str]) -> dict[str, object]:
    """Header values of a file, without reading its pixels. pydicom's warnings about odd
    values quote the value, so they are silenced here: header values must not reach logs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        return header_values(ds, keywords)


def encode(header: Header, features: list[FeatureSpec]) -> np.ndarray:
    """One input vector (width,) float32; missing values imputed as trained."""
    parts: list[float] = []
    for spec in features:
        raw = header.get(spec.keyword)
        if spec.type == "numeric":
            value = numeric(spec.keyword, raw)
            missing = value is None
            parts += [0.0 if missing else (value - spec.mean) / (spec.std or 1.0),  # type: ignore[operator]
                      1.0 if missing else 0.0]
        else:
            onehot = [0.0] * (len(spec.categories) + 1)
            name = category(raw)
            onehot[spec.categories.index(name) if name in spec.categories else -1] = 1.0
            parts += onehot
    return np.asarray(parts, np.float32)


def fit_features(headers: Sequence[Header], keywords: list[str],
                 max_categories: int = 12) -> list[FeatureSpec]:
    """Choose each keyword's encoding from training headers: numeric when most present
    values are numbers, else categorical over the most frequent values."""
    specs = []
    for keyword in keywords:
        raw = [h.get(keyword) for h in headers]
        present = [v for v in raw if v is not None and v != ""]
        numbers = [n for n in (numeric(keyword, v) for v in present) if n is not None]
        if present and len(numbers) >= 0.8 * len(present) and keyword != "PatientSex":
            array = np.asarray(numbers, np.float64)
            specs.append(FeatureSpec(keyword=keyword, type="numeric", mean=float(array.mean()),
                                     std=float(array.std()) or 1.0))
            continue
        counts: dict[str, int] = {}
        for value in present:
            name = category(value)
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
        top = sorted(counts, key=lambda k: (-counts[k], k))[:max_categories]
        specs.append(FeatureSpec(keyword=keyword, type="categorical", categories=sorted(top)))
    return specs


def prepare_header_file(path: Path | str, manifest: Manifest) -> np.ndarray:
    """The model input of one file for a tabular manifest: (width, 1, 1) float32."""
    keywords = [f.keyword for f in manifest.features]
    return encode(read_header(path, keywords), manifest.features)[:, None, None]


def fused_input(header_vector: np.ndarray, scores: np.ndarray, manifest: Manifest) -> np.ndarray:
    """A late-fusion head's input for one image: its encoded header values (width, 1, 1) and
    then the image model's scores, as the trainer built them: (width + scores, 1, 1)."""
    assert manifest.fuse_with is not None
    extra = np.asarray(scores, np.float32).reshape(-1)
    if extra.shape[0] != manifest.fuse_with.width:
        raise ValueError(f"image model gave {extra.shape[0]} score(s), the fusion head "
                         f"takes {manifest.fuse_with.width}")
    return np.concatenate([np.asarray(header_vector, np.float32).reshape(-1),
                           extra])[:, None, None]
