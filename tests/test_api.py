"""REST API v1 against a running `lightbox api` process, on SQLite and PostgreSQL.

The database is filled through the real write paths (folder registration with quarantine,
dispatch with the packaged rules, the job transitions of `db/jobs.py`, the worker's result
writer, heatmaps as the worker saves them); export outbox rows are written as the exporter
writes them. Then every endpoint is called over HTTP: auth (401/403), keyset pages, CSV, the
timeline of an unrouted study, of a study with a quarantined file, a dead job, a retried job
and a dead export, writes and their audit events.
"""

from __future__ import annotations

import csv
import io
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from db import jobs as job_states
from db.models import Event, Export, ExportState, Job, Study
from db.session import session_scope
from lightbox.heatmaps import save_heatmap
from lightbox.synthetic import write_ct_study, write_study
from scheduler.ingest.folder import ingest_paths
from scheduler.scheduling.dispatch import PassReport, dispatch_ready
from scheduler.scheduling.route import load_rules
from tests.conftest import Backend, api_in_thread, run_cli
from worker.writer import write_results

OPERATOR, READER = "operator-token-1234", "reader-token-5678"
TOKENS = [{"name": "ops", "token": OPERATOR, "role": "operator"},
          {"name": "ris", "token": READER, "role": "read"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Seeded:
    chest: list[str]          # routed chest studies, newest last
    ct: str                   # unrouted
    done_job: int
    dead_job: int
    retried_job: int
    heatmap_sop: str


def seed(backend: Backend, model_id: int, tmp: Path, chest_studies: int = 5) -> Seeded:
    """Real registration, quarantine and dispatch; jobs moved through db/jobs.py."""
    settings = backend.settings.model_copy(update={"quiet_seconds": 0.0})
    rng = np.random.default_rng(7)
    inbox = tmp / "inbox"
    chest = [write_study(inbox, rng, label=i % 2, images=1 + (i == 0), size=128,
                         patient_id=f"SYN{i:04d}") for i in range(chest_studies)]
    ct = write_ct_study(inbox)
    # A file of the first chest study cut short: quarantined, and its study named in the event.
    (inbox / "cut.dcm").write_bytes(chest[0].paths[0].read_bytes()[:2000])
    counts = ingest_paths(settings, [inbox])
    assert counts["quarantined"] == 1, counts
    dispatch_ready(settings, load_rules(), PassReport())
    with session_scope(settings.sqlalchemy_url) as session:
        jobs = {uid: session.scalar(select(Job.id).join(Study, Job.study_id == Study.id)
                                    .where(Study.study_instance_uid == uid))
                for uid in (s.study_instance_uid for s in chest)}
    assert all(jobs.values()), jobs
    done, dead, retried = (jobs[chest[i].study_instance_uid] for i in range(3))
    with session_scope(settings.sqlalchemy_url) as session:
        for job_id in (done, dead, retried):
            assert job_states.claim(session, job_id, "worker-a") is not None
        for job_id in (dead, retried):
            job_states.fail(session, session.get(Job, job_id), code="decode_failed",
                            detail="pixel data cannot be decoded", retryable=False,
                            max_attempts=3)
    first = chest[0]
    rows = []
    with session_scope(settings.sqlalchemy_url) as session:
        study_id = session.scalar(select(Study.id).where(
            Study.study_instance_uid == first.study_instance_uid))
    for sop in first.sop_instance_uids:
        rows.append({"job_id": done, "study_id": study_id, "series_instance_uid": None,
                     "sop_instance_uid": sop, "label": "pneumonia", "score": 0.91,
                     "threshold": 0.5, "positive": True, "superseded": False})
    write_results(settings, done, rows)
    cam = np.zeros((1, 8, 8), dtype=np.float32)
    cam[0, 2:5, 3:6] = 1.0
    save_heatmap(settings, done, first.sop_instance_uids[0], cam)
    with session_scope(settings.sqlalchemy_url) as session:
        session.add(Export(job_id=done, destination="pacs", kind="sr", state=ExportState.sent,
                           attempts=1, sent_at=datetime.now(timezone.utc)))
        session.add(Export(job_id=done, destination="web", kind="sr", state=ExportState.dead,
                           attempts=6, error_code="http_503",
                           error_detail="service unavailable after 6 attempts"))
    return Seeded([s.study_instance_uid for s in chest], ct, done, dead, retried,
                  first.sop_instance_uids[0])


@pytest.fixture
def api(backend: Backend, registered_model: tuple[int, str],
        tmp_path: Path) -> Iterator[tuple[httpx.Client, Seeded, Backend]]:
    """The API in this process (what `lightbox api` serves, over real HTTP): the API's answers
    are the point here; test_stow and test_limits start the process."""
    seeded = seed(backend, registered_model[0], tmp_path)
    backend.env.update({"LIGHTBOX_API_TOKENS": json.dumps(TOKENS),
                        "LIGHTBOX_API_TOKEN": "legacy-token-0000"})
    settings = backend.settings.model_copy(update={"api_tokens": TOKENS,
                                                   "api_token": "legacy-token-0000"})
    with api_in_thread(settings) as base, httpx.Client(
            base_url=base, timeout=60, headers={"Authorization": f"Bearer {OPERATOR}"}) as client:
        yield client, seeded, backend


def test_api_v1(api: tuple[httpx.Client, Seeded, Backend]) -> None:
    client, seeded, backend = api
    base = str(client.base_url)
    reader = {"Authorization": f"Bearer {READER}"}

    # -- auth: no token 401, unknown token 401, read role 403 on writes; legacy token works
    for path in ("/api/v1/studies", "/openapi.json", "/docs", "/api/v1/status"):
        assert httpx.get(base + path).status_code == 401, path
    assert httpx.get(base + "/api/v1/studies",
                     headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(base + "/api/v1/studies", headers={
        "Authorization": "Bearer legacy-token-0000"}).status_code == 200
    refused = httpx.post(f"{base}/api/v1/jobs/{seeded.dead_job}/retry", headers=reader)
    assert refused.status_code == 403 and "operator" in refused.json()["detail"]
    assert httpx.post(f"{base}/dicom-web/studies", headers=reader,
                      content=b"x").status_code == 403
    schema = client.get("/openapi.json").json()
    assert "/api/v1/studies/{study_uid}" in schema["paths"]
    assert "/api/v1/findings" in client.get("/docs").text

    # -- study list: newest first, keyset pages, filters
    everything = client.get("/api/v1/studies", params={"limit": 500}).json()
    uids = [s["study_instance_uid"] for s in everything["items"]]
    assert set(uids) == {*seeded.chest, seeded.ct} and everything["next"] is None
    pages, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/api/v1/studies", params=params).json()
        pages.extend(s["study_instance_uid"] for s in page["items"])
        after = page["next"]
        if not after:
            break
    assert pages == uids
    unrouted = client.get("/api/v1/studies", params={"state": "unrouted"}).json()["items"]
    assert [s["study_instance_uid"] for s in unrouted] == [seeded.ct]
    assert unrouted[0]["modalities"] == ["CT"]
    failed = client.get("/api/v1/studies", params={"state": "failed"}).json()["items"]
    assert {s["study_instance_uid"] for s in failed} == set(seeded.chest[1:3])
    done = client.get("/api/v1/studies", params={"state": "done"}).json()["items"]
    assert [s["study_instance_uid"] for s in done] == [seeded.chest[0]]
    scored = client.get("/api/v1/studies", params={"label": "pneumonia",
                                                   "min_score": 0.9}).json()["items"]
    assert [s["study_instance_uid"] for s in scored] == [seeded.chest[0]]
    assert client.get("/api/v1/studies", params={"min_score": 0.95}).json()["items"] == []
    cr = client.get("/api/v1/studies", params={"modality": "CR",
                                               "priority": "routine"}).json()["items"]
    assert len(cr) == len(seeded.chest)
    for bad in ({"limit": 501}, {"state": "sleeping"}, {"after": "@@@"},
                {"since": "yesterday"}, {"min_score": "high"}):
        response = client.get("/api/v1/studies", params=bad)
        assert 400 <= response.status_code < 500 and "detail" in response.json(), bad

    # -- the unrouted study: why
    ct = client.get(f"/api/v1/studies/{seeded.ct}").json()
    assert ct["state"] == "unrouted" and ct["findings"] == [] and ct["jobs"] == []
    texts = [e["text"] for e in ct["timeline"]]
    assert texts[0].startswith("received 1 instance from folder")
    assert any("unrouted" in t and "no routing rule matched" in t for t in texts)
    assert client.get("/api/v1/studies/1.2.3.999").status_code == 404

    # -- a finished study: findings with a heatmap link, exports (one dead), quarantined file
    first = client.get(f"/api/v1/studies/{seeded.chest[0]}").json()
    assert first["series"][0]["tags"]["BodyPartExamined"] == "CHEST"
    assert "PatientName" not in json.dumps(first) and "SYN0000" not in json.dumps(first)
    assert sum(s["instances"] for s in first["series"]) == 2
    finding = next(f for f in first["findings"] if f["sop_instance_uid"] == seeded.heatmap_sop)
    assert finding["model"] == "chest" and finding["threshold"] == 0.5
    assert finding["heatmap_url"] == f"/api/v1/heatmaps/{seeded.done_job}/{seeded.heatmap_sop}.png"
    assert {e["state"] for e in first["exports"]} == {"sent", "dead"}
    kinds = [e["kind"] for e in first["timeline"]]
    for kind in ("received", "file_quarantined", "study_dispatched", "job_queued",
                 "job_started", "job_succeeded", "export_sent", "export_dead"):
        assert kind in kinds, (kind, kinds)
    assert kinds.index("received") < kinds.index("study_dispatched") < kinds.index("job_started")
    dead_text = next(e["text"] for e in first["timeline"] if e["kind"] == "export_dead")
    assert "web" in dead_text and "http_503" in dead_text
    png = client.get(finding["heatmap_url"])
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(f"/api/v1/heatmaps/{seeded.done_job}/1.2.3.png").status_code == 404
    assert client.get(finding["heatmap_url"], params={"label": "x"}).status_code == 400

    # -- jobs: list by state, retry (audited, in the timeline), cancel, conflicts
    dead = client.get("/api/v1/jobs", params={"state": "dead"}).json()["items"]
    assert {j["job_id"] for j in dead} == {seeded.dead_job, seeded.retried_job}
    assert dead[0]["error_code"] == "decode_failed" and dead[0]["worker"] == "worker-a"
    all_jobs = client.get("/api/v1/jobs", params={"limit": 1}).json()
    assert len(all_jobs["items"]) == 1 and all_jobs["next"]
    retried = client.post(f"/api/v1/jobs/{seeded.retried_job}/retry")
    assert retried.status_code == 200 and retried.json()["state"] == "queued"
    assert client.post(f"/api/v1/jobs/{seeded.retried_job}/retry").status_code == 409
    assert client.post(f"/api/v1/jobs/{seeded.done_job}/cancel").status_code == 409
    assert client.post("/api/v1/jobs/999999/retry").status_code == 404
    timeline = client.get(f"/api/v1/studies/{seeded.chest[2]}").json()["timeline"]
    texts = [e["text"] for e in timeline]
    assert any("failed: decode_failed" in t and "dead" in t for t in texts)
    assert any("retried by api:ops (was dead)" in t for t in texts)
    dead_study = client.get(f"/api/v1/studies/{seeded.chest[1]}").json()
    assert dead_study["state"] == "failed"
    assert dead_study["jobs"][0]["error_detail"] == "pixel data cannot be decoded"
    cancelled = client.post(f"/api/v1/jobs/{seeded.retried_job}/cancel")
    assert cancelled.json()["state"] == "cancelled"
    assert client.get(f"/api/v1/jobs/{seeded.retried_job}").json()["state"] == "cancelled"

    # -- findings: JSON pages and a streamed CSV
    findings = client.get("/api/v1/findings", params={"limit": 1}).json()
    assert len(findings["items"]) == 1 and findings["next"]
    rest = client.get("/api/v1/findings", params={"after": findings["next"]}).json()
    assert len(rest["items"]) == 1 and rest["next"] is None
    assert rest["items"][0]["finding_id"] < findings["items"][0]["finding_id"]
    with client.stream("GET", "/api/v1/findings", params={"format": "csv",
                                                          "study": seeded.chest[0]}) as r:
        assert r.headers["content-type"].startswith("text/csv")
        text = "".join(r.iter_text())
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2 and {r["label"] for r in rows} == {"pneumonia"}
    assert client.get("/api/v1/findings", params={"format": "xml"}).status_code == 422
    assert client.get("/api/v1/findings", params={"min_score": 0.99}).json()["items"] == []

    # -- models: list, one, promote (audited); unknown ones 404
    models = client.get("/api/v1/models", headers=reader).json()
    assert models[0]["name"] == "chest" and models[0]["stage"] == "production"
    version = models[0]["version"]
    one = client.get(f"/api/v1/models/chest/{version}").json()
    assert "auroc" in one["metrics"] and one["thresholds"] and one["training_data"]
    assert client.get("/api/v1/models/chest/nope").status_code == 404
    assert client.post(f"/api/v1/models/chest/{version}/promote", headers=reader).status_code == 403
    assert client.post(f"/api/v1/models/chest/{version}/promote").json()["stage"] == "production"
    assert client.post(f"/api/v1/models/chest/{version}/retire", headers=reader).status_code == 403
    assert client.post("/api/v1/models/chest/nope/retire").status_code == 404
    retired = client.post(f"/api/v1/models/chest/{version}/retire",
                          params={"reason": "api test"}).json()
    assert retired["stage"] == "retired"
    assert client.post(f"/api/v1/models/chest/{version}/promote",
                       params={"reason": "back"}).json()["stage"] == "production"
    # The registry's own events name the token (as the CLI names the OS user).
    with session_scope(backend.settings.sqlalchemy_url) as session:
        model_events = [(e.kind, e.detail.get("actor"), e.detail.get("reason"))
                        for e in session.scalars(select(Event).where(Event.kind.in_(
                            ["model_retired", "model_promoted"])).order_by(Event.id))]
    assert model_events[-2:] == [("model_retired", "token:ops", "api test"),
                                 ("model_promoted", "token:ops", "back")], model_events

    # -- status: what `lightbox status --format json` gives, without file names
    status = client.get("/api/v1/status").json()
    assert status["jobs"]["dead"] == 1 and status["quarantined_total"] == 1
    assert status["exports"]["dead"] == 1
    assert "name" not in status["quarantined"][0]
    out = run_cli(backend.env, "status", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["jobs"] == status["jobs"]

    # -- every write was audited with the token's name
    with session_scope(backend.settings.sqlalchemy_url) as session:
        audits = [e.detail for e in session.scalars(
            select(Event).where(Event.kind == "api_audit").order_by(Event.id))]
    assert [(a["token"], a["action"]) for a in audits] == [
        ("ops", "retry"), ("ops", "cancel"), ("ops", "promote"), ("ops", "retire"),
        ("ops", "promote")]


def test_explain(backend: Backend, registered_model: tuple[int, str], tmp_path: Path) -> None:
    """`lightbox explain`: the study page's timeline in the shell; an unknown study fails."""
    seeded = seed(backend, registered_model[0], tmp_path, chest_studies=3)
    out = run_cli(backend.env, "explain", seeded.ct)
    assert out.returncode == 0, out.stderr
    assert "unrouted" in out.stdout and "no routing rule matched" in out.stdout
    out = run_cli(backend.env, "explain", seeded.chest[0], "--format", "json")
    assert out.returncode == 0, out.stderr
    kinds = [e["kind"] for e in json.loads(out.stdout)["timeline"]]
    assert "file_quarantined" in kinds and "export_dead" in kinds
    empty = run_cli(backend.env, "results", "--study", seeded.ct, "--format", "json")
    assert empty.returncode == 0, empty.stderr
    assert json.loads(empty.stdout) == []
    assert "unrouted" in empty.stderr and f"lightbox explain {seeded.ct}" in empty.stderr
    missing = run_cli(backend.env, "explain", "1.2.3.4.5")
    assert missing.returncode != 0 and "not known" in (missing.stdout + missing.stderr)
