"""Export outbox: results back to PACS.

Two steps per pass, both driven by the database (the source of truth):

1. **build** — every succeeded job without export rows gets its objects built once (an SR with
   its findings; a heatmap SC per source image that has a class-activation map) under
   ``outputs/<job>/``, and one ``exports`` row per object and destination (destinations chosen
   by the routing rule's ``export`` list, else all). A job whose objects cannot be built gets
   dead rows with the reason, so it is visible and never rebuilt in a loop.
2. **send** — due pending rows (``not_before`` passed) are sent, one association / request
   per destination. Transient failures move ``not_before`` forward with exponential backoff,
   until ``LIGHTBOX_EXPORT_MAX_ATTEMPTS``; permanent failures are dead at once. Nothing sleeps
   between retries: a row is simply not due yet.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import exists, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.locking import skip_locked
from db.models import (
    Export,
    ExportState,
    Finding,
    Instance,
    Job,
    JobState,
    Series,
    Study,
)
from db.session import session_scope
from db.volume_tables import JobSeries
from lightbox import metrics
from lightbox.errors import LightboxError
from lightbox.heatmaps import load_heatmap
from lightbox.roots import stored_file, to_storage
from lightbox.settings import Settings
from scheduler.export.destinations import Destination, SendResult, load_destinations
from scheduler.export.dicom.common import FindingItem, ModelInfo
from scheduler.export.dicom.heatmap_sc import build_heatmap_sc
from scheduler.export.dicom.sr import build_sr
from scheduler.export.dicom.volume_export import build_volume_objects, volume_findings
from scheduler.scheduling.route import load_rules

log = logging.getLogger(__name__)

BUILD_BATCH = 20
SEND_BATCH = 100
# Python and pydicom errors of a source that cannot be read or decoded.
BUILD_ERRORS = (LightboxError, OSError, ValueError, TypeError, KeyError, AttributeError,
                IndexError, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class BuiltObject:
    kind: str  # "sr" | "sc"
    sop_instance_uid: str
    source_sop_instance_uid: str
    path: Path


def outputs_dir(settings: Settings, job_id: int) -> Path:
    return settings.storage_dir / ".outputs" / str(job_id)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def backoff(settings: Settings, attempts: int) -> timedelta:
    seconds = settings.export_backoff_seconds * 2 ** max(0, attempts - 1)
    return timedelta(seconds=min(seconds, settings.export_backoff_max_seconds))


def _destinations_for(session: Session, settings: Settings, job: Job,
                      known: dict[str, Destination]) -> list[str]:
    """The routing rules that route this study to this job's model name the destinations;
    without an ``export`` list on any of them, results go to every destination."""
    rules = load_rules(settings.rules_file)
    tags = [s.tags for s in session.scalars(select(Series).where(Series.study_id == job.study_id))]
    # A series-level rule's ranges read pseudo-tags (Slices) the stored tags lack: the job
    # records which rule chose its series.
    by_series_rule = session.get(JobSeries, job.id)
    chosen: set[str] = set()
    explicit = False
    for rule in rules:
        if job.model.name in rule.models and (
                (by_series_rule is not None and rule.name == by_series_rule.rule)
                or any(rule.matches(t) for t in tags)):
            if rule.export is not None:
                explicit = True
                chosen.update(rule.export)
    if not explicit:
        return sorted(known)
    unknown = chosen - set(known)
    if unknown:
        log.error("job %d: routing rule names unknown export destinations %s", job.id,
                  sorted(unknown))
    return sorted(chosen & set(known))


def _sources(session: Session, job: Job, findings: list[Finding]) -> list[Instance]:
    uids = {f.sop_instance_uid for f in findings if f.sop_instance_uid}
    query = (select(Instance).join(Series, Instance.series_id == Series.id)
             .where(Series.study_id == job.study_id, Instance.stored_path.is_not(None),
                    Instance.study_revision <= job.study_revision)
             .order_by(Instance.id))
    if uids:
        query = query.where(Instance.sop_instance_uid.in_(uids))
    return list(session.scalars(query))


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)


def build_objects(settings: Settings, session: Session, job: Job) -> list[BuiltObject]:
    """Write the SR (and heatmap SCs) for ``job``; raises BUILD_ERRORS when the SR cannot be.
    Volume jobs (series findings) get a SEG and a TID 1500 SR referencing it instead."""
    series = volume_findings(session, job)
    if series:
        return [BuiltObject(kind, uid, "", path) for kind, uid, path in
                build_volume_objects(settings, session, job, series,
                                     outputs_dir(settings, job.id))]
    findings = list(session.scalars(  # shadow versions' findings are never exported
        select(Finding).where(Finding.job_id == job.id, Finding.shadow.is_(False))
        .order_by(Finding.id)))
    instances = _sources(session, job, findings)
    if not instances:
        raise LightboxError("no stored source instance for the job's study")
    model = ModelInfo(job.model.name, job.model.version,
                      synthetic=any(f.synthetic for f in findings) or
                      job.model.manifest.get("training_data", {}).get("kind") == "synthetic")
    labels = [str(x) for x in job.model.manifest.get("labels", [])]
    headers = [pydicom.dcmread(stored_file(settings, i.stored_path or ""),
                               stop_before_pixels=True) for i in instances]
    items = [FindingItem(f.label, f.score, f.threshold, f.positive, f.sop_instance_uid,
                         f.distribution, f.indeterminate) for f in findings]
    folder = outputs_dir(settings, job.id)
    sr_uid = generate_uid()
    _save(build_sr(headers, items, model, sop_instance_uid=sr_uid), folder / f"sr-{sr_uid}.dcm")
    built = [BuiltObject("sr", sr_uid, "", folder / f"sr-{sr_uid}.dcm")]
    series_uid = generate_uid()
    for number, instance in enumerate(instances, start=1):
        cam = load_heatmap(settings, job.id, instance.sop_instance_uid)
        if cam is None:
            if job.model.manifest.get("cam_output"):
                log.warning("job %d: no heatmap for %s under %s (is LIGHTBOX_STORAGE_DIR the "
                            "volume the workers write to?)", job.id, instance.sop_instance_uid,
                            settings.heatmaps_dir)
            continue
        scores = {f.label: f.score for f in findings
                  if f.sop_instance_uid == instance.sop_instance_uid}
        index = _map_index(labels, scores, cam)
        label = labels[index] if index < len(labels) else f"class {index}"
        try:
            source = pydicom.dcmread(stored_file(settings, instance.stored_path or ""))
            sc_uid = generate_uid()
            sc = build_heatmap_sc(source, cam[index], label, model,
                                  series_instance_uid=series_uid, instance_number=number,
                                  sop_instance_uid=sc_uid)
            _save(sc, folder / f"sc-{sc_uid}.dcm")
        except BUILD_ERRORS as exc:  # the SR still goes out; the map is logged as lost
            log.error("job %d: heatmap SC for %s not built: %s", job.id,
                      instance.sop_instance_uid, type(exc).__name__)
            continue
        built.append(BuiltObject("sc", sc_uid, instance.sop_instance_uid,
                                 folder / f"sc-{sc_uid}.dcm"))
    return built


def _map_index(labels: list[str], scores: dict[str, float], cam: np.ndarray) -> int:
    """One SC per image: the map of the label the model scored highest on it."""
    if scores and labels:
        best = max(scores, key=lambda k: scores[k])
        if best in labels and labels.index(best) < cam.shape[0]:
            return labels.index(best)
    return 0


def _jobs_to_build(session: Session) -> list[Job]:
    has_rows = exists().where(Export.job_id == Job.id)
    return list(session.scalars(
        select(Job).where(Job.state == JobState.succeeded, ~has_rows)
        .order_by(Job.id).limit(BUILD_BATCH)))


def build_pass(settings: Settings) -> int:
    """Create outbox rows for succeeded jobs that have none. Returns rows created."""
    known = load_destinations(settings)
    if not known:
        return 0
    created = 0
    with session_scope(settings.sqlalchemy_url) as session:
        job_ids = [j.id for j in _jobs_to_build(session)]
    for job_id in job_ids:
        try:
            with session_scope(settings.sqlalchemy_url) as session:
                created += _build_job(settings, session, session.get(Job, job_id), known)
        except IntegrityError:  # another exporter built this job first
            log.info("job %d: export rows already created elsewhere", job_id)
    return created


def _build_job(settings: Settings, session: Session, job: Job | None,
               known: dict[str, Destination]) -> int:
    if job is None:
        return 0
    names = _destinations_for(session, settings, job, known)
    if not names:  # routed to no destination: one marker row so the job is not re-examined
        session.add(Export(job_id=job.id, destination="-", kind="none", state=ExportState.sent,
                           error_detail="no export destination for this job"))
        return 1
    try:
        built = build_objects(settings, session, job)
    except BUILD_ERRORS as exc:
        detail = f"{type(exc).__name__}: {exc}"[:500]
        log.error("job %d: results not built: %s", job.id, detail)
        for name in names:
            session.add(Export(job_id=job.id, destination=name, kind="sr",
                               state=ExportState.dead, error_code="build_failed",
                               error_detail=detail))
        return len(names)
    for name in names:
        for obj in built:
            session.add(Export(job_id=job.id, destination=name, kind=obj.kind,
                               sop_instance_uid=obj.sop_instance_uid,
                               source_sop_instance_uid=obj.source_sop_instance_uid,
                               path=to_storage(settings, obj.path)))
    study = session.get(Study, job.study_id)
    log.info("job %d: %d object(s) for %s (study %s)", job.id, len(built), names,
             study.study_instance_uid if study else "?")
    return len(names) * len(built)


def _due(session: Session, now: datetime) -> list[Export]:
    query = (select(Export)
             .where(Export.state == ExportState.pending,
                    or_(Export.not_before.is_(None), Export.not_before <= now))
             .order_by(Export.id).limit(SEND_BATCH))
    return list(session.scalars(skip_locked(session, query)))


def _apply(settings: Settings, row: Export, result: SendResult, now: datetime) -> str:
    outcome = _judge(settings, row, result, now)
    metrics.EXPORTS.labels(outcome).inc()
    return outcome


def _judge(settings: Settings, row: Export, result: SendResult, now: datetime) -> str:
    row.attempts += 1
    if result.ok:
        row.state, row.sent_at, row.error_code, row.error_detail = (
            ExportState.sent, now, None, None)
        return "sent"
    row.error_code, row.error_detail = result.code[:64], result.detail[:1000]
    if result.transient and row.attempts < settings.export_max_attempts:
        row.not_before = now + backoff(settings, row.attempts)
        return "retry"
    row.state = ExportState.dead
    log.error("export %d (%s %s to %s) dead after %d attempt(s): %s %s", row.id, row.kind,
              row.sop_instance_uid, row.destination, row.attempts, result.code, result.detail)
    return "dead"


def send_pass(settings: Settings) -> dict[str, int]:
    """Send every due row once. Returns counts by outcome (sent / retry / dead)."""
    known = load_destinations(settings)
    counts: dict[str, int] = defaultdict(int)
    with session_scope(settings.sqlalchemy_url) as session:
        now = _now()
        by_destination: dict[str, list[Export]] = defaultdict(list)
        for row in _due(session, now):
            by_destination[row.destination].append(row)
        for name, rows in by_destination.items():
            destination = known.get(name)
            if destination is None:
                results = [SendResult(False, False, "unknown_destination",
                                      f"destination {name!r} is not configured")] * len(rows)
            else:
                results = destination.send([stored_file(settings, r.path or "") for r in rows],
                                           settings.export_timeout)
            now = _now()
            for row, result in zip(rows, results, strict=True):
                counts[_apply(settings, row, result, now)] += 1
    return dict(counts)


def export_pass(settings: Settings) -> dict[str, int]:
    """Build, then send: one outbox pass."""
    built = build_pass(settings)
    return {"built": built, **send_pass(settings)}


def run_export(settings: Settings, stop: threading.Event) -> None:
    """The outbox loop of `lightbox export`. A failing pass is logged and retried next time."""
    load_destinations(settings)  # a bad configuration stops the command at once
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    log.info("export outbox running (%d destination(s))", len(settings.export_destinations))
    while not stop.is_set():
        try:
            counts = export_pass(settings)
            if any(counts.values()):
                log.info("export pass: %s", counts)
        except Exception:  # noqa: BLE001 - database hiccups must not end the outbox loop
            log.exception("export pass failed; retrying")
        stop.wait(settings.export_interval)

