"""Scheduler promises checked where they could break: a study whose model has no production
version is unrouted with that reason (through dispatch), `lightbox scheduler` itself applies
retention, and job retries back off 5 s doubling up to 10 min with jitter."""

from __future__ import annotations

import statistics
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from db import jobs as job_states
from db.model_registry import register_bundle, retire
from db.models import Event, Instance, Job, JobState, Model, Study, StudyStatus
from db.session import session_scope
from lightbox.celery_app import make_celery
from lightbox.roots import stored_file
from lightbox.synthetic import write_study
from scheduler.ingest.registration import register_file
from scheduler.scheduling.dispatch import PassReport, dispatch_ready
from scheduler.scheduling.passes import run_scheduler
from scheduler.scheduling.route import load_rules
from tests.conftest import Backend, wait_for

# --- unrouted: no production version ----------------------------------------------------------


@pytest.mark.parametrize("model_state", ["none", "registered_not_promoted", "retired"])
def test_study_whose_model_has_no_production_version_is_unrouted(
        sqlite_backend: Backend, model_bundle: Path, tmp_path: Path, model_state: str) -> None:
    """The rule matches, but its model has no production version (never registered, only
    registered, or its production version retired): the study is ``unrouted``, no job is
    created, and the event says why; a study of another, promoted model is dispatched."""
    settings = sqlite_backend.settings.model_copy(update={"quiet_seconds": 0.0})
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n"
                     "  - {name: cr, match: {Modality: CR}, models: [chest, missing-model]}\n")
    if model_state != "none":
        with session_scope(settings.sqlalchemy_url) as session:
            model = register_bundle(session, model_bundle, promote=model_state == "retired")
            if model_state == "retired":
                session.flush()
                retire(session, model.name, model.version)
    study = write_study(tmp_path / "study", np.random.default_rng(1), label=1, images=1,
                        size=64)
    for path in study.paths:
        register_file(settings, path)
    report = PassReport()
    dispatch_ready(settings, load_rules(rules), report)
    assert (report.studies_unrouted, report.studies_dispatched, report.jobs_created) == (1, 0, 0)
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.scalars(select(Study).where(
            Study.study_instance_uid == study.study_instance_uid)).one()
        assert row.status == StudyStatus.unrouted
        assert list(session.scalars(select(Job))) == []
        events = [(e.study_instance_uid, e.detail["reason"]) for e in session.scalars(
            select(Event).where(Event.kind == "study_unrouted"))]
    assert events == [(study.study_instance_uid,
                       "no production version of model(s): chest, missing-model")]


def test_study_with_every_model_in_production_is_dispatched(
        sqlite_backend: Backend, model_bundle: Path, tmp_path: Path) -> None:
    """The control for the test above: the same rule with a promoted model dispatches."""
    settings = sqlite_backend.settings.model_copy(update={"quiet_seconds": 0.0})
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: cr, match: {Modality: CR}, models: [chest]}\n")
    with session_scope(settings.sqlalchemy_url) as session:
        model_id = register_bundle(session, model_bundle, promote=True).id
    study = write_study(tmp_path / "study", np.random.default_rng(2), label=1, images=1,
                        size=64)
    for path in study.paths:
        register_file(settings, path)
    report = PassReport()
    dispatch_ready(settings, load_rules(rules), report)
    assert (report.studies_unrouted, report.studies_dispatched, report.jobs_created) == (0, 1, 1)
    with session_scope(settings.sqlalchemy_url) as session:
        assert [(j.model_id, j.state) for j in session.scalars(select(Job))] == [
            (model_id, JobState.queued)]


# --- retention applied by the running scheduler -----------------------------------------------


def _stored(backend: Backend) -> dict[str, str | None]:
    with session_scope(backend.settings.sqlalchemy_url) as session:
        return {i.sop_instance_uid: i.stored_path and str(stored_file(backend.settings,
                                                                       i.stored_path))
                for i in session.scalars(select(Instance))}


def test_lightbox_scheduler_applies_retention(sqlite_backend: Backend, tmp_path: Path) -> None:
    """The scheduler's loop with ``LIGHTBOX_RETENTION_DAYS=1``: the pixels of a study
    received 3 days ago are deleted (row kept, ``stored_path`` NULL, file gone); those of a
    study received now are kept."""
    settings = sqlite_backend.settings
    paths = {}
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths[name] = tmp_path / name
        ds.save_as(paths[name], enforce_file_format=True)
        register_file(settings, paths[name])
    old_uid = str(pydicom.dcmread(paths["CT_small.dcm"]).SOPInstanceUID)
    new_uid = str(pydicom.dcmread(paths["MR_small.dcm"]).SOPInstanceUID)
    with session_scope(settings.sqlalchemy_url) as session:
        session.execute(update(Instance).where(Instance.sop_instance_uid == old_uid).values(
            received_at=datetime.now(timezone.utc) - timedelta(days=3)))
    before = _stored(sqlite_backend)
    old_file, new_file = Path(before[old_uid] or ""), Path(before[new_uid] or "")
    assert old_file.is_file() and new_file.is_file()
    # The scheduler's own loop (what `lightbox scheduler` runs) in a thread: the loop applying
    # retention is the point, not the process.
    kept = settings.model_copy(update={"retention_days": 1.0, "scheduler_interval": 0.2,
                                       "reconcile_interval": 0.5})
    stop = threading.Event()
    loop = threading.Thread(target=run_scheduler, args=(kept, make_celery(kept), stop))
    loop.start()
    try:
        wait_for(lambda: _stored(sqlite_backend)[old_uid] is None, 90,
                 what="the scheduler deleting the expired pixels")
    finally:
        stop.set()
        loop.join(timeout=60)
    assert not old_file.exists()
    assert _stored(sqlite_backend) == {old_uid: None, new_uid: str(new_file)}
    assert new_file.is_file()
    with session_scope(settings.sqlalchemy_url) as session:
        kinds = list(session.scalars(select(Event.kind).where(Event.kind == "pixels_deleted")))
    assert kinds == ["pixels_deleted"]


# --- job retry backoff -------------------------------------------------------------------------


def _ceiling(attempts: int) -> float:
    return min(600.0, 5.0 * 2 ** (attempts - 1))


def test_job_backoff_doubles_from_5s_caps_at_10min_with_jitter() -> None:
    """Each delay lies in [ceiling/2, ceiling] with ceiling 5, 10, 20, ... 600 s, and is
    jittered: draws spread over that range instead of repeating one value."""
    assert [_ceiling(n) for n in range(1, 11)] == [5, 10, 20, 40, 80, 160, 320, 600, 600, 600]
    for attempts in range(1, 13):
        ceiling = _ceiling(attempts)
        draws = [job_states.backoff_seconds(attempts) for _ in range(400)]
        assert ceiling / 2 <= min(draws) and max(draws) <= ceiling, attempts
        # 400 uniform draws over [c/2, c]: both ends of the range are reached within c/10.
        assert min(draws) < ceiling * 0.6 and max(draws) > ceiling * 0.9, attempts
        assert len(set(draws)) > 390 and statistics.pstdev(draws) > ceiling / 20


def test_failed_job_not_before_follows_the_backoff(sqlite_backend: Backend, model_bundle: Path,
                                                   tmp_path: Path) -> None:
    """Through :func:`db.jobs.fail`: a retryable failure of attempt n sets ``not_before``
    between ceiling(n)/2 and ceiling(n) after ``finished_at``; the last attempt is dead."""
    url = sqlite_backend.settings.sqlalchemy_url
    register_file(sqlite_backend.settings, Path(get_testdata_file("CT_small.dcm")))
    with session_scope(url) as session:
        model_id = register_bundle(session, model_bundle, promote=True).id
        study_id = session.scalars(select(Study.id)).one()
        assert session.get(Model, model_id) is not None
    for attempts in range(1, 11):
        with session_scope(url) as session:
            job = Job(study_id=study_id, study_revision=attempts, model_id=model_id,
                      state=JobState.running, attempts=attempts)
            session.add(job)
            session.flush()
            job_states.fail(session, job, code="boom", detail="test", retryable=True,
                            max_attempts=10)
            assert job.finished_at is not None
            if attempts < 10:
                assert job.state == JobState.failed
                assert job.not_before is not None
                delay = (job.not_before - job.finished_at).total_seconds()
                assert _ceiling(attempts) / 2 <= delay <= _ceiling(attempts), attempts
            else:
                assert (job.state, job.not_before) == (JobState.dead, None)
