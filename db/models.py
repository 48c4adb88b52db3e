"""SQLAlchemy 2 models. No patient names, IDs, birth dates or accession numbers are stored:
studies are known by their UIDs only."""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are UTC everywhere; SQLite drops the zone, so put it back on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime()}


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    """Enums are stored by value, as plain strings (portable across SQLite and PostgreSQL)."""
    return Enum(
        cls,
        name=name,
        native_enum=False,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class StudyStatus(str, enum.Enum):
    receiving = "receiving"  # instances are arriving; not yet quiet
    dispatched = "dispatched"  # jobs were created for the current revision
    unrouted = "unrouted"  # quiet, but no routing rule matched


class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    dead = "dead"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.dead, JobState.cancelled)


class Priority(str, enum.Enum):
    stat = "stat"
    routine = "routine"


class ModelStage(str, enum.Enum):
    staging = "staging"
    production = "production"
    retired = "retired"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[StudyStatus] = mapped_column(
        _enum(StudyStatus, "study_status"), default=StudyStatus.receiving
    )
    # Bumped when an instance arrives after the study was dispatched: new jobs, old findings
    # superseded.
    revision: Mapped[int] = mapped_column(Integer, default=1)
    dispatched_revision: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[Priority] = mapped_column(_enum(Priority, "priority"), default=Priority.routine)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    routed_at: Mapped[datetime | None] = mapped_column(default=None)

    series: Mapped[list[Series]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study")

    __table_args__ = (Index("ix_studies_status_last", "status", "last_received_at"),)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    # Routing tags (Modality, BodyPartExamined, ViewPosition, SeriesDescription, ...); never PHI.
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    stored_path: Mapped[str | None] = mapped_column(Text)  # None once retention deleted it
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    study_revision: Mapped[int] = mapped_column(Integer, default=1)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    source: Mapped[str] = mapped_column(String(32), default="folder")

    series: Mapped[Series] = relationship(back_populates="instances")


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    stage: Mapped[ModelStage] = mapped_column(
        _enum(ModelStage, "model_stage"), default=ModelStage.staging
    )
    bundle_path: Mapped[str] = mapped_column(Text)
    manifest: Mapped[dict[str, Any]] = mapped_column()
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A staging version that runs beside production on the same jobs (`lightbox models shadow`).
    shadow: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_revision: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.queued)
    priority: Mapped[Priority] = mapped_column(_enum(Priority, "priority"), default=Priority.routine)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Outbox: set once the Celery message was handed to Redis. NULL means "send it".
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    not_before: Mapped[datetime | None] = mapped_column(default=None)
    # A routine job that waited past LIGHTBOX_STAT_AGING_SECONDS was sent again at STAT priority.
    escalated_at: Mapped[datetime | None] = mapped_column(default=None)
    worker: Mapped[str | None] = mapped_column(String(255))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_detail: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="jobs")
    model: Mapped[Model] = relationship()

    __table_args__ = (
        UniqueConstraint("study_id", "study_revision", "model_id", name="uq_jobs_study_rev_model"),
        Index("ix_jobs_state", "state"),
    )


class Finding(Base):
    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    # Empty (NULL) for a study-level finding.
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool] = mapped_column(Boolean)
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Issue 23. Multiclass: one row per image; ``label`` is the arg-max class, ``score`` its
    # probability, ``distribution`` every class's probability, ``indeterminate`` the top
    # probability fell below the model's confident threshold. ``positive`` is never true for
    # the background class or an indeterminate image.
    predicted_class: Mapped[str | None] = mapped_column(String(64), default=None)
    distribution: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    indeterminate: Mapped[bool] = mapped_column(Boolean, default=False)
    # Written by a shadow version (``model_id``) beside production on the same job: stored and
    # compared, never exported.
    shadow: Mapped[bool] = mapped_column(Boolean, default=False)
    # The model was trained on SYNTHETIC data: not for clinical use.
    synthetic: Mapped[bool] = mapped_column(Boolean, default=False)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"), default=None)

    __table_args__ = (
        UniqueConstraint("job_id", "sop_instance_uid", "label", "shadow",
                         name="uq_findings_job_sop_label_shadow"),
        Index("ix_findings_label_score", "label", "score"),
    )


class Event(Base):
    """Append-only event log: what happened to which UID, for audit and `lightbox status`."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class QuarantinedFile(Base):
    __tablename__ = "quarantined_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    # Keyed one-way digests (scheduler/ingest/quarantine.py): the same name or sender gives the same
    # digest on one install, but neither can be read back. The name itself is never stored.
    name_digest: Mapped[str | None] = mapped_column(String(64))
    sender_digest: Mapped[str | None] = mapped_column(String(64))
    quarantine_path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    reason_code: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)


class WorkerNode(Base):
    """A worker process that has been seen, with the runtime it serves models on."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), unique=True)
    runtime: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class ExportState(str, enum.Enum):
    pending = "pending"  # waiting for its not_before, then sent by the outbox pass
    sent = "sent"
    dead = "dead"  # permanent failure, or transient failures until the attempt limit


class Export(Base):
    """Export outbox: one DICOM result object (SR or heatmap SC) for one destination.

    Rows are written when a succeeded job's objects are built; the sender retries transient
    failures by moving ``not_before`` (no sleeping loops) and marks permanent ones dead."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # "sr" or "sc"
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))  # of the object sent
    # The source image of a heatmap SC; "" for the study-level SR.
    source_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str | None] = mapped_column(Text)
    state: Mapped[ExportState] = mapped_column(
        _enum(ExportState, "export_state"), default=ExportState.pending
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_detail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("job_id", "destination", "kind", "source_sop_instance_uid",
                         name="uq_exports_job_dest_kind_src"),
        Index("ix_exports_job_id", "job_id"),
        Index("ix_exports_state_not_before", "state", "not_before"),
    )
