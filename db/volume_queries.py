"""Read side of the volume path: series-level findings for `lightbox results` (and the demo)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Job, Model, Study
from db.volume_tables import SeriesFinding

SERIES_KEYS = ("study_instance_uid", "series_instance_uid", "model", "model_version", "label",
               "score", "threshold", "positive", "lesion_count", "volume_ml",
               "largest_diameter_mm", "centroid_x", "centroid_y", "centroid_z", "superseded",
               "created_at", "job_id")


def series_findings(session: Session, *, study_uid: str | None = None, label: str | None = None,
                    min_score: float | None = None, since: datetime | None = None,
                    include_superseded: bool = False) -> list[dict[str, Any]]:
    f = SeriesFinding
    query = (select(Study.study_instance_uid, f.series_instance_uid, Model.name, Model.version,
                    f.label, f.score, f.threshold, f.positive, f.lesion_count, f.volume_ml,
                    f.largest_diameter_mm, f.centroid_x, f.centroid_y, f.centroid_z,
                    f.superseded, f.created_at, Job.id)
             .join(Job, f.job_id == Job.id).join(Model, Job.model_id == Model.id)
             .join(Study, f.study_id == Study.id)
             .order_by(f.created_at, Study.study_instance_uid, Model.name))
    if study_uid:
        query = query.where(Study.study_instance_uid == study_uid)
    if label:
        query = query.where(f.label == label)
    if min_score is not None:
        query = query.where(f.score >= min_score)
    if since is not None:
        query = query.where(f.created_at >= since)
    if not include_superseded:
        query = query.where(f.superseded.is_(False))
    return [dict(zip(SERIES_KEYS, row, strict=True)) for row in session.execute(query)]
