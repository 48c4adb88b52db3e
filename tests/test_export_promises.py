"""Export promises checked exactly, against a real local HTTP server as the STOW-RS destination:

- retries back off by doubling from ``LIGHTBOX_EXPORT_BACKOFF_SECONDS`` up to the cap, and end
  dead after ``LIGHTBOX_EXPORT_MAX_ATTEMPTS``;
- a STOW-RS destination's 408/429/5xx are retried, any other 4xx is dead at once;
- a routing rule's ``export: [...]`` list chooses the destinations (without one: all);
- our own STOW-RS API answers 200 when every instance was stored and 409 when none was.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from db.model_registry import register_bundle
from db.models import Export, ExportState, Instance
from db.session import session_scope
from lightbox.settings import Settings
from lightbox.synthetic import write_study
from scheduler.export.destinations import SendResult, StowDestination
from scheduler.export.outbox import backoff, build_pass, export_pass, send_pass
from tests.conftest import Backend
from tests.test_export import configured, rows, succeeded_job
from tests.test_stow import TOKEN, _api, _multipart


class StowPeer:
    """A real HTTP server on loopback: ``/<name>/studies`` answers ``statuses[name]`` (with
    ``bodies[name]`` as DICOM JSON) and records every request's path."""

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {}
        self.bodies: dict[str, dict[str, object]] = {}
        self.requests: list[str] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                name = self.path.strip("/").split("/")[0]
                peer.requests.append(self.path)
                body = json.dumps(peer.bodies.get(name, {})).encode()
                self.send_response(peer.statuses[name])
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def destination(self, name: str, status: int) -> dict[str, object]:
        self.statuses[name] = status
        return {"name": name, "type": "stow", "url": self.url(name)}


@pytest.fixture
def stow_peer() -> Iterator[StowPeer]:
    peer = StowPeer()
    yield peer
    peer.server.shutdown()
    peer.server.server_close()


@pytest.fixture
def dicom_file(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "object.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# --- STOW-RS destination: which answers are retried ------------------------------------------


@pytest.mark.parametrize(("status", "transient"), [
    (408, True), (429, True), (500, True), (502, True), (503, True), (504, True),
    (400, False), (401, False), (403, False), (404, False), (405, False), (413, False),
    (415, False)])
def test_stow_destination_status_classification(stow_peer: StowPeer, dicom_file: Path,
                                                status: int, transient: bool) -> None:
    destination = StowDestination("web", stow_peer.url("web"))
    stow_peer.statuses["web"] = status
    assert destination.send([dicom_file], 10.0) == [SendResult(
        False, transient, f"http_{status}", f"{stow_peer.url('web')}/studies answered {status}")]
    assert stow_peer.requests == ["/web/studies"]


def test_stow_destination_per_instance_results(stow_peer: StowPeer, tmp_path: Path) -> None:
    """200: all stored. 202 and 409: each instance judged by its FailureReason (0xA7xx
    transient, others permanent; instances not listed as failed were stored)."""
    paths, uids = [], []
    for i in range(3):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    destination = StowDestination("web", stow_peer.url("web"))

    def failed(*reasons: tuple[str, int]) -> dict[str, object]:
        return {"00081198": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [r]}}
            for uid, r in reasons]}}

    stow_peer.statuses["web"] = 200
    assert [(r.ok, r.transient) for r in destination.send(paths, 10.0)] == [(True, False)] * 3
    stow_peer.statuses["web"] = 202
    stow_peer.bodies["web"] = failed((uids[1], 0xA700), (uids[2], 0xC000))
    assert [(r.ok, r.transient, r.code) for r in destination.send(paths, 10.0)] == [
        (True, False, ""), (False, True, "status_A700"), (False, False, "status_C000")]
    stow_peer.statuses["web"] = 409
    stow_peer.bodies["web"] = failed(*((uid, 0x0110) for uid in uids))
    assert [(r.ok, r.transient, r.code) for r in destination.send(paths, 10.0)] == [
        (False, False, "status_0110")] * 3


# --- the outbox: backoff sequence, dead at once, dead after the last attempt ------------------


def _utc(value: datetime | None) -> datetime:
    assert value is not None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def test_backoff_doubles_up_to_the_cap() -> None:
    settings = Settings(export_backoff_seconds=10, export_backoff_max_seconds=900)
    assert [backoff(settings, n).total_seconds() for n in range(1, 11)] == [
        10, 20, 40, 80, 160, 320, 640, 900, 900, 900]


def _model_id(backend: Backend, model_bundle: Path) -> int:
    with session_scope(backend.settings.sqlalchemy_url) as session:
        return register_bundle(session, model_bundle, promote=True).id


def test_outbox_retries_transient_with_doubling_backoff_and_kills_4xx_at_once(
        backend: Backend, model_bundle: Path, stow_peer: StowPeer, tmp_path: Path) -> None:
    """One job, two STOW-RS destinations: ``busy`` answers 503 every time, ``bad`` 400. The
    400 row is dead after one request. The 503 row waits 100, 200, 350 (cap), 350 s between
    attempts — each ``not_before`` set exactly that long after its attempt — and is dead after
    the 5th (``max_attempts``). Time is not waited for: ``not_before`` is moved to the past."""
    settings = configured(backend, [stow_peer.destination("busy", 503),
                                           stow_peer.destination("bad", 400)],
                          export_backoff_seconds=100.0, export_backoff_max_seconds=350.0,
                          export_max_attempts=5)
    job_id = succeeded_job(backend, _model_id(backend, model_bundle), tmp_path,
                           heatmap=False)
    assert build_pass(settings) == 2
    delays = []
    for attempt in range(1, 6):
        before = datetime.now(timezone.utc)
        counts = send_pass(settings)
        after = datetime.now(timezone.utc)
        by_destination = {r.destination: r for r in rows(settings)}
        busy, bad = by_destination["busy"], by_destination["bad"]
        assert (bad.state, bad.attempts, bad.error_code) == (ExportState.dead, 1, "http_400")
        assert (busy.job_id, busy.attempts, busy.error_code) == (job_id, attempt, "http_503")
        if attempt < 5:
            assert counts == ({"retry": 1, "dead": 1} if attempt == 1 else {"retry": 1})
            assert busy.state == ExportState.pending
            delay = [100, 200, 350, 350][attempt - 1]
            assert before + timedelta(seconds=delay) <= _utc(busy.not_before) <= after + (
                timedelta(seconds=delay))
            delays.append(delay)
            with session_scope(settings.sqlalchemy_url) as session:  # "time passes"
                session.execute(update(Export).where(Export.id == busy.id).values(
                    not_before=datetime.now(timezone.utc) - timedelta(seconds=1)))
        else:
            assert counts == {"dead": 1}
            assert busy.state == ExportState.dead
    assert delays == [100, 200, 350, 350]
    assert stow_peer.requests.count("/bad/studies") == 1
    assert stow_peer.requests.count("/busy/studies") == 5
    for _ in range(2):  # dead rows are never sent again
        export_pass(settings)
    assert len(stow_peer.requests) == 6


# --- a routing rule's export list --------------------------------------------------------------


@pytest.mark.parametrize(("export", "expected"), [
    ("[web-a]", {"web-a"}), ("[web-a, web-c]", {"web-a", "web-c"}),
    (None, {"web-a", "web-b", "web-c"})])
def test_rule_export_list_chooses_destinations(sqlite_backend: Backend, model_bundle: Path,
                                               stow_peer: StowPeer, tmp_path: Path,
                                               export: str | None, expected: set[str]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: chest\n    match: {Modality: CR}\n    models: [chest]\n"
                     + (f"    export: {export}\n" if export else ""))
    settings = configured(sqlite_backend, [stow_peer.destination(n, 200)
                                           for n in ("web-a", "web-b", "web-c")],
                          rules_file=rules)
    job_id = succeeded_job(sqlite_backend, _model_id(sqlite_backend, model_bundle), tmp_path,
                           heatmap=False)
    counts = export_pass(settings)
    assert counts == {"built": len(expected), "sent": len(expected)}
    assert {(r.job_id, r.destination, r.state) for r in rows(settings)} == {
        (job_id, name, ExportState.sent) for name in expected}
    assert sorted(stow_peer.requests) == sorted(f"/{n}/studies" for n in expected)


# --- our own STOW-RS: 200 and 409 --------------------------------------------------------------


def test_own_stow_answers_200_for_all_and_409_for_none(sqlite_backend: Backend,
                                                       tmp_path: Path) -> None:
    study = write_study(tmp_path / "syn", np.random.default_rng(21), label=0, images=2, size=64)
    headers = {"Accept": "application/dicom+json", "Authorization": f"Bearer {TOKEN}"}
    with _api(sqlite_backend) as url:
        body, content_type = _multipart([p.read_bytes() for p in study.paths])
        all_stored = httpx.post(f"{url}/dicom-web/studies", content=body, timeout=120,
                                headers={**headers, "Content-Type": content_type})
        body, content_type = _multipart([b"not dicom", b"\x00" * 200])
        none_stored = httpx.post(f"{url}/dicom-web/studies", content=body, timeout=120,
                                 headers={**headers, "Content-Type": content_type})
    assert all_stored.status_code == 200, all_stored.text
    stored = all_stored.json()
    assert "00081198" not in stored
    assert [i["00081155"]["Value"][0] for i in stored["00081199"]["Value"]] == list(
        study.sop_instance_uids)
    assert none_stored.status_code == 409, none_stored.text
    refused = none_stored.json()
    assert "00081199" not in refused
    assert [i["00081197"]["Value"][0] for i in refused["00081198"]["Value"]] == [0xC210, 0xC210]
    with session_scope(sqlite_backend.settings.sqlalchemy_url) as session:
        assert set(session.scalars(select(Instance.sop_instance_uid))) == set(
            study.sop_instance_uids)
