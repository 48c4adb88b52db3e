"""Build a volume job's result objects for the export outbox: a DICOM SEG of its lesion mask
(positive series) and a TID 1500 SR of its series findings referencing the SEG.

Called by :func:`scheduler.export.outbox.build_objects` for jobs that have series findings; returns
``(kind, sop_instance_uid, path)`` for each object written under the job's outputs folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Instance, Job, Series
from db.volume_tables import SeriesFinding
from lightbox.errors import LightboxError
from lightbox.roots import stored_file
from lightbox.settings import Settings
from scheduler.export.dicom.common import ModelInfo
from scheduler.export.dicom.seg import build_seg
from scheduler.export.dicom.volume_sr import SeriesResult, build_volume_sr


def volume_findings(session: Session, job: Job) -> list[SeriesFinding]:
    return list(session.scalars(select(SeriesFinding).where(SeriesFinding.job_id == job.id)
                                .order_by(SeriesFinding.id)))


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)


def build_volume_objects(settings: Settings, session: Session, job: Job,
                         findings: list[SeriesFinding],
                         folder: Path) -> list[tuple[str, str, Path]]:
    model = ModelInfo(job.model.name, job.model.version)
    synthetic = bool((job.model.manifest.get("training_data") or {}).get("synthetic"))
    series_uid = findings[0].series_instance_uid
    stored = {uid: stored_file(settings, path) for uid, path in session.execute(
        select(Instance.sop_instance_uid, Instance.stored_path)
        .join(Series, Instance.series_id == Series.id)
        .where(Instance.stored_path.is_not(None), Series.series_instance_uid == series_uid))
        if path is not None}
    if not stored:
        raise LightboxError(f"no stored instance of series {series_uid}")
    built: list[tuple[str, str, Path]] = []
    seg = None
    # (label, mask path) of the positive findings that have a mask.
    with_mask = [(f.label, f.mask_path) for f in findings if f.mask_path and f.positive]
    if with_mask:
        saved = np.load(stored_file(settings, with_mask[0][1]))
        uids = [str(u) for u in saved["sop_instance_uids"]]
        # Frame numbers (0: a single-frame instance) of Enhanced multi-frame sources.
        numbers = [int(n) for n in saved["frames"]] if "frames" in saved else [0] * len(uids)
        missing = [u for u in uids if u not in stored]
        if missing:
            raise LightboxError(f"source instance {missing[0]} of the mask is no longer stored")
        # Headers only: the SEG needs the sources' geometry, not their pixels.
        sources = [pydicom.dcmread(stored[u], stop_before_pixels=True) for u in dict.fromkeys(uids)]
        seg_uid = generate_uid()
        frames = list(zip(uids, numbers, strict=True)) if any(numbers) else None
        seg = build_seg(sources, saved["mask"], [with_mask[0][0]], model, frames=frames,
                        synthetic=synthetic, sop_instance_uid=seg_uid)
        _save(seg, folder / f"seg-{seg_uid}.dcm")
        built.append(("seg", seg_uid, folder / f"seg-{seg_uid}.dcm"))
        headers = sources
    else:
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in list(stored.values())[:1]]
    results = [SeriesResult(f.label, f.score, f.threshold, f.positive, f.lesion_count,
                            f.volume_ml, f.largest_diameter_mm) for f in findings]
    sr_uid = generate_uid()
    sr = build_volume_sr(headers, results, model, seg=seg, sop_instance_uid=sr_uid)
    _save(sr, folder / f"sr-{sr_uid}.dcm")
    built.append(("sr", sr_uid, folder / f"sr-{sr_uid}.dcm"))
    return built
