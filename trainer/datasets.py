"""Labelled image sets for training, decoded and preprocessed by the worker's own code.

Sources (each becomes a :class:`DatasetSource`, a list of files with targets and a patient key):

* ``rsna``: the RSNA Pneumonia Detection Challenge layout, ``stage_2_train_labels.csv``
  (``patientId,x,y,width,height,Target``; several rows per patient collapse to one label, the
  maximum Target) and one ``<patientId>.dcm`` per patient;
* ``csv``: a folder of DICOM files and a labels CSV with a ``file`` column, an optional
  ``patient`` column and either one ``label`` column (class names: binary when they are 0/1,
  else multi-class) or several 0/1 columns (multi-label, one column per label);
* ``folders``: one sub-folder per class (multi-class; binary when there are two classes and
  one is called normal/negative/0);
* ``synthetic``: SYNTHETIC radiographs from :mod:`lightbox.synthetic`, never patient data.

Every file goes through :func:`lightbox.preprocess.prepare_file`, the code the worker runs; the
prepared array is cached as ``.npy`` keyed by the file's sha256 and the preprocessing spec, so
only the first epoch-run decodes. Patient identifiers are hashed on reading and only used to
keep a patient inside one split; they are never written anywhere.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from lightbox.errors import ConfigurationError, PixelDecodeError
from lightbox.manifest import Manifest
from lightbox.preprocess import PREPARE_VERSION, prepare_file

log = logging.getLogger(__name__)

RSNA_LABELS_CSV = "stage_2_train_labels.csv"
RSNA_LABEL = "pneumonia"
NEGATIVE_CLASS_NAMES = ("normal", "negative", "0", "no_finding", "healthy")
DICOM_SUFFIXES = (".dcm", ".dicom", "")
Progress = Callable[[str, int, int], None]


def hash_patient(identifier: str) -> str:
    """A stable key for grouping one patient's images; the identifier itself is not kept."""
    return hashlib.sha256(f"lightbox-patient:{identifier}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SourceItem:
    path: Path
    target: tuple[float, ...]
    patient: str | None = None  # hashed; None = read PatientID from the file


@dataclass
class DatasetSource:
    """Files with targets, before decoding. ``describe`` is safe to store in a manifest."""

    kind: str
    labels: list[str]
    task: str
    items: list[SourceItem]
    describe: dict[str, object] = field(default_factory=dict)


@dataclass
class LabelledSet:
    """Prepared model inputs: x (N, C, H, W) float32, y (N, labels) float32, hashed patients."""

    x: np.ndarray
    y: np.ndarray
    patients: np.ndarray
    labels: list[str]
    task: str
    summary: dict[str, object]

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, index: np.ndarray) -> LabelledSet:
        return LabelledSet(self.x[index], self.y[index], self.patients[index], self.labels,
                           self.task, self.summary)


# --- sources ---------------------------------------------------------------------------------


def rsna_source(root: Path, labels_csv: str = RSNA_LABELS_CSV) -> DatasetSource:
    """The RSNA Pneumonia Detection Challenge layout (one label per patient)."""
    csv_path = root / labels_csv
    if not csv_path.is_file():
        raise ConfigurationError(f"no {labels_csv} in {root}")
    targets: dict[str, float] = {}
    rows = 0
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"patientId", "Target"} <= set(reader.fieldnames):
            raise ConfigurationError(f"{labels_csv} needs patientId and Target columns")
        for row in reader:
            rows += 1
            value = float(row["Target"])
            targets[row["patientId"]] = max(value, targets.get(row["patientId"], 0.0))
    items, missing = [], 0
    for patient_id, target in targets.items():
        path = root / f"{patient_id}.dcm"
        if not path.is_file():
            missing += 1
            continue
        items.append(SourceItem(path, (target,), hash_patient(patient_id)))
    if missing:
        log.warning("RSNA layout: %d labelled patients have no .dcm file (skipped)", missing)
    return DatasetSource("rsna", [RSNA_LABEL], "binary", items, {
        "kind": "rsna", "root": str(root.resolve()), "labels_csv": labels_csv,
        "csv_rows": rows, "missing_files": missing})


def csv_source(root: Path, labels_csv: Path) -> DatasetSource:
    """Files named in a labels CSV (see module docstring for the columns)."""
    with labels_csv.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if "file" not in columns:
        raise ConfigurationError(f"{labels_csv.name} needs a 'file' column")
    label_columns = [c for c in columns if c not in ("file", "patient")]
    if label_columns == ["label"]:
        classes = sorted({r["label"] for r in rows})
        if set(classes) <= {"0", "1"}:
            labels, task = ["label"], "binary"
            targets: list[tuple[float, ...]] = [(float(r["label"]),) for r in rows]
        else:
            labels, task = classes, "multiclass"
            targets = [tuple(float(r["label"] == c) for c in classes) for r in rows]
    elif label_columns:
        labels, task = label_columns, "multilabel" if len(label_columns) > 1 else "binary"
        targets = [tuple(float(r[c]) for c in label_columns) for r in rows]
    else:
        raise ConfigurationError(f"{labels_csv.name} has no label column")
    items = [SourceItem(root / r["file"], t,
                        hash_patient(r["patient"]) if r.get("patient") else None)
             for r, t in zip(rows, targets, strict=True)]
    return DatasetSource("csv", labels, task, items, {
        "kind": "csv", "root": str(root.resolve()), "labels_csv": str(labels_csv.resolve())})


def folder_source(root: Path) -> DatasetSource:
    """One sub-folder per class; DICOM files anywhere below each."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ConfigurationError(f"{root} needs at least two class folders, found {classes}")
    negatives = [c for c in classes if c.lower() in NEGATIVE_CLASS_NAMES]
    binary = len(classes) == 2 and len(negatives) == 1
    labels = [c for c in classes if c not in negatives] if binary else classes
    items = []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if not path.is_file() or path.suffix.lower() not in DICOM_SUFFIXES:
                continue
            target = (float(name == labels[0]),) if binary else tuple(
                float(i == index) for i in range(len(classes)))
            items.append(SourceItem(path, target))
    return DatasetSource("folders", labels, "binary" if binary else "multiclass", items,
                         {"kind": "folders", "root": str(root.resolve()), "classes": classes})


def open_source(path: Path, labels_csv: Path | None = None) -> DatasetSource:
    """Pick the layout: an explicit labels CSV, the RSNA CSV, or class folders."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigurationError(f"dataset folder {path} does not exist")
    if labels_csv is not None:
        return csv_source(path, labels_csv)
    if (path / RSNA_LABELS_CSV).is_file():
        return rsna_source(path)
    return folder_source(path)


def source_from_summary(summary: dict[str, object]) -> DatasetSource:
    """Re-open the source a manifest's ``training_data`` describes (for ``lightbox compile``)."""
    kind, root = summary.get("kind"), Path(str(summary.get("root", "")))
    if kind == "rsna":
        return rsna_source(root, str(summary.get("labels_csv", RSNA_LABELS_CSV)))
    if kind == "csv":
        return csv_source(root, Path(str(summary["labels_csv"])))
    if kind == "folders":
        return folder_source(root)
    raise ConfigurationError(f"cannot re-open a training source of kind {kind!r}")


# --- decoding with a cache -------------------------------------------------------------------


def spec_digest(manifest: Manifest) -> str:
    """What a prepared array depends on besides the file: input and preprocessing spec, and the
    version of the preprocessing code (a change there must not serve stale arrays)."""
    spec = {"input": manifest.input.model_dump(), "pre": manifest.preprocessing.model_dump(),
            "code": PREPARE_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class PreparedCache:
    """``<dir>/<spec digest>/<sha256 of file>.npy``: a file prepared once is never decoded
    again for the same spec; a changed file (new sha) or spec (new digest) misses."""

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self.directory = directory / spec_digest(manifest)
        self.manifest = manifest
        self.hits = self.misses = 0

    def prepare(self, path: Path) -> np.ndarray:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        cached = self.directory / f"{digest}.npy"
        if cached.is_file():
            try:
                array = np.load(cached, allow_pickle=False)
                self.hits += 1
                return array
            except (OSError, ValueError):
                log.warning("unreadable cache entry %s; preparing again", cached.name)
        array = prepare_file(path, self.manifest)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as handle:
            np.save(handle, array, allow_pickle=False)
        os.replace(tmp, cached)
        self.misses += 1
        return array


def _header(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """(PatientID, (rows, columns)) without reading pixels; unreadable → PixelDecodeError."""
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=[
            "PatientID", "Rows", "Columns"])
    except Exception as exc:  # pydicom raises many types for broken files
        raise PixelDecodeError(f"cannot read {path.name}: {type(exc).__name__}") from exc
    patient = str(ds.get("PatientID", "") or "") or None
    rows, cols = ds.get("Rows"), ds.get("Columns")
    return patient, (int(rows), int(cols)) if rows and cols else None


def load_source(
    source: DatasetSource, manifest: Manifest, cache_dir: Path,
    progress: Progress | None = None,
) -> LabelledSet:
    """Decode (or read from cache) every item; unreadable files are skipped with a count."""
    cache = PreparedCache(cache_dir, manifest)
    arrays, targets, patients, sizes = [], [], [], set()
    skipped: dict[str, int] = {}
    total = len(source.items)
    for done, item in enumerate(source.items, 1):
        if progress:
            progress("decoding DICOM", done, total)
        try:
            patient_id, size = _header(item.path)
            arrays.append(cache.prepare(item.path))
        except (PixelDecodeError, OSError) as exc:
            code = type(exc).__name__
            skipped[code] = skipped.get(code, 0) + 1
            # File names can carry patient identifiers (RSNA: <patientId>.dcm): log the index.
            log.warning("training item %d of %d skipped: %s", done, total, code)
            continue
        targets.append(item.target)
        # No PatientID: the file is its own patient (cannot leak, cannot be grouped).
        patients.append(item.patient or hash_patient(patient_id or str(item.path.resolve())))
        if size:
            sizes.add(size)
    if not arrays:
        raise ConfigurationError(f"no usable images in the {source.kind} dataset")
    summary = {**source.describe, "images": len(arrays), "skipped": skipped,
               "source_image_sizes": sorted(f"{r}x{c}" for r, c in sizes)[:20],
               "cache": {"hits": cache.hits, "misses": cache.misses}}
    return LabelledSet(np.stack(arrays).astype(np.float32, copy=False),
                       np.asarray(targets, np.float32), np.asarray(patients),
                       source.labels, source.task, summary)
