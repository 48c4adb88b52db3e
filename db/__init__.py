"""The database: the source of truth that ingest, scheduler, worker and outputs share."""

from db.models import (
    Base,
    Event,
    Finding,
    Instance,
    Job,
    JobState,
    Model,
    ModelStage,
    Priority,
    QuarantinedFile,
    Series,
    Study,
    StudyStatus,
    WorkerNode,
)
from db.session import make_engine, session_scope, sessionmaker_for

__all__ = [
    "Base",
    "Event",
    "Finding",
    "Instance",
    "Job",
    "JobState",
    "Model",
    "ModelStage",
    "Priority",
    "QuarantinedFile",
    "Series",
    "Study",
    "StudyStatus",
    "WorkerNode",
    "make_engine",
    "session_scope",
    "sessionmaker_for",
]
