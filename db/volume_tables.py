"""Tables of the volume path (issue 17), kept apart from :mod:`db.models` so 2-D tables and
their findings stay as they are: the series a volume job runs on, and series-level findings.

A series finding is one label of one job on one series: the model's score and, for
segmentation models, what the mask measures (lesion count, total volume in mL, largest
diameter in mm, centroid in patient LPS coordinates) and where the mask is stored (for the SEG).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from db.models import Base, utcnow


class JobSeries(Base):
    """The series chosen by a series-level routing rule for one job (one per job)."""

    __tablename__ = "job_series"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                        primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(String(64))


class SeriesFinding(Base):
    __tablename__ = "series_findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool] = mapped_column(Boolean)
    lesion_count: Mapped[int | None] = mapped_column(Integer)
    volume_ml: Mapped[float | None] = mapped_column(Float)
    largest_diameter_mm: Mapped[float | None] = mapped_column(Float)
    centroid_x: Mapped[float | None] = mapped_column(Float)
    centroid_y: Mapped[float | None] = mapped_column(Float)
    centroid_z: Mapped[float | None] = mapped_column(Float)
    # Label map (uint8, source series grid) saved by the worker for the DICOM SEG.
    mask_path: Mapped[str | None] = mapped_column(Text)
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
