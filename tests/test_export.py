"""The export outbox against real DICOM peers: a destination that rejects the association ends
dead after one attempt (no retry loop); one that is down is retried with backoff and succeeds
once a real dcmtk storescp listens; transient failures end dead after N attempts."""

from __future__ import annotations

import json
import subprocess
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from db.models import Export, ExportState, Finding, Instance, Job, JobState, Study
from db.session import session_scope
from lightbox.heatmaps import save_heatmap
from lightbox.settings import Settings
from lightbox.synthetic import write_study
from scheduler.export.destinations import classify_status
from scheduler.export.outbox import export_pass
from scheduler.ingest.registration import register_file
from tests.conftest import Backend, run_cli, stop_processes, wait_for
from tests.pacs_peers import dciodvfy_errors, dcmtk_env, free_port, require


def succeeded_job(backend: Backend, model_id: int, tmp_path: Path, *, heatmap: bool) -> int:
    """A study registered through the real path, with a succeeded job and its findings (what
    a worker leaves behind), and optionally a class-activation map per image."""
    study = write_study(tmp_path / "study", np.random.default_rng(11), label=1, images=2,
                        size=128)
    for path in study.paths:
        register_file(backend.settings, path)
    with session_scope(backend.settings.sqlalchemy_url) as session:
        row = session.scalars(select(Study).where(
            Study.study_instance_uid == study.study_instance_uid)).one()
        job = Job(study_id=row.id, study_revision=row.revision, model_id=model_id,
                  state=JobState.succeeded, attempts=1, finished_at=datetime.now(timezone.utc))
        session.add(job)
        session.flush()
        for i, uid in enumerate(study.sop_instance_uids):
            session.add(Finding(job_id=job.id, study_id=row.id, sop_instance_uid=uid,
                                label="pneumonia", score=0.9 - 0.5 * i, threshold=0.5,
                                positive=i == 0))
        job_id = job.id
    if heatmap:
        y, x = np.mgrid[0:16, 0:16]
        for uid in study.sop_instance_uids:
            save_heatmap(backend.settings, job_id, uid,
                         np.exp(-((x - 8) ** 2 + (y - 5) ** 2) / 12.0)[None])
    return job_id


def configured(backend: Backend, destinations: list[dict[str, object]], **extra: object
               ) -> Settings:
    return backend.settings.model_copy(update={
        "export_destinations": destinations, "export_backoff_seconds": 0.2,
        "export_backoff_max_seconds": 0.5, "export_timeout": 10.0, **extra})


def rows(settings: Settings) -> list[Export]:
    with session_scope(settings.sqlalchemy_url) as session:
        return list(session.scalars(select(Export).where(Export.kind != "none")
                                    .order_by(Export.id)))


class RejectingPeer:
    """A pynetdicom SCP that only talks to another calling AE: our association is rejected."""

    def __init__(self, port: int) -> None:
        self.requests = 0
        self._lock = threading.Lock()
        ae = AE(ae_title="STRICT")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.require_calling_aet = ["SOMEONE_ELSE"]
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_CONN_OPEN, self._opened)])

    def _opened(self, event: evt.Event) -> None:
        with self._lock:
            self.requests += 1


def test_rejected_association_is_dead_without_retry(backend: Backend,
                                                    registered_model: tuple[int, str],
                                                    tmp_path: Path) -> None:
    port = free_port()
    peer = RejectingPeer(port)
    try:
        settings = configured(backend, [{"name": "strict", "type": "dicom",
                                         "ae_title": "STRICT", "host": "127.0.0.1",
                                         "port": port}])
        job_id = succeeded_job(backend, registered_model[0], tmp_path, heatmap=False)
        for _ in range(4):  # later passes must not touch a dead row
            export_pass(settings)
        exported = rows(settings)
        assert [(r.job_id, r.kind, r.state, r.attempts, r.error_code) for r in exported] == [
            (job_id, "sr", ExportState.dead, 1, "association_rejected")]
        assert peer.requests == 1
        status = json.loads(run_cli(backend.env, "status", "--format", "json").stdout)
        assert status["exports"]["dead"] == 1
        assert [(d["job_id"], d["destination"], d["error_code"])
                for d in status["dead_exports"]] == [(job_id, "strict", "association_rejected")]
    finally:
        peer.server.shutdown()


def test_down_destination_retried_until_up(backend: Backend, registered_model: tuple[int, str],
                                           tmp_path: Path) -> None:
    require("storescp", "dciodvfy")
    port = free_port()
    settings = configured(backend, [{"name": "archive", "type": "dicom", "ae_title": "ARCHIVE",
                                     "host": "127.0.0.1", "port": port}],
                          export_max_attempts=1000)
    job_id = succeeded_job(backend, registered_model[0], tmp_path, heatmap=True)
    export_pass(settings)
    first = rows(settings)
    assert {r.kind for r in first} == {"sr", "sc"} and len(first) == 3  # SR + one SC per image
    assert {(r.state, r.attempts, r.error_code) for r in first} == {
        (ExportState.pending, 1, "connection_failed")}
    assert all(r.not_before is not None and r.not_before > r.created_at for r in first)

    received = tmp_path / "received"
    received.mkdir()
    storescp = subprocess.Popen(["storescp", "-aet", "ARCHIVE", "-od", str(received), str(port)],
                                env=dcmtk_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def all_sent() -> bool:
            export_pass(settings)
            return all(r.state == ExportState.sent for r in rows(settings))

        wait_for(all_sent, 60, interval=0.3, what="exports sent once the destination is up")
    finally:
        stop_processes([storescp])
    final = rows(settings)
    assert all(r.attempts >= 2 and r.job_id == job_id for r in final)
    files = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in received.iterdir()}
    assert set(files) == {r.sop_instance_uid for r in final}
    for path in files.values():
        assert dciodvfy_errors(path) == []
    sr = pydicom.dcmread(next(files[r.sop_instance_uid] for r in final if r.kind == "sr"))
    assert sr.VerificationFlag == "UNVERIFIED"
    with session_scope(settings.sqlalchemy_url) as session:
        sources = set(session.scalars(select(Instance.sop_instance_uid)))
    evidence = {ref.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    assert evidence == sources


def test_transient_failures_end_dead_after_max_attempts(sqlite_backend: Backend,
                                                        model_bundle: Path,
                                                        tmp_path: Path) -> None:
    from db.model_registry import register_bundle

    with session_scope(sqlite_backend.settings.sqlalchemy_url) as session:
        model_id = register_bundle(session, model_bundle, promote=True).id
    settings = configured(sqlite_backend, [{"name": "down", "type": "dicom", "ae_title": "X",
                                            "host": "127.0.0.1", "port": free_port()}],
                          export_max_attempts=3, export_backoff_seconds=0.0)
    succeeded_job(sqlite_backend, model_id, tmp_path, heatmap=False)
    for _ in range(6):
        export_pass(settings)
    assert [(r.state, r.attempts, r.error_code) for r in rows(settings)] == [
        (ExportState.dead, 3, "connection_failed")]


@pytest.mark.parametrize(("status", "ok", "transient"), [
    (0x0000, True, False), (0xB007, True, False), (0xA700, False, True),
    (0xA7FF, False, True), (0xC000, False, False), (0xA900, False, False),
    (0x0122, False, False)])
def test_status_classification(status: int, ok: bool, transient: bool) -> None:
    result = classify_status(status)
    assert (result.ok, result.transient) == (ok, transient)
