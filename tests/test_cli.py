"""The `lightbox` command as operators and scripts use it: ingest, results filters and formats,
status, models, db upgrade — real processes against a real SQLite database."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from alembic.script import ScriptDirectory
from sqlalchemy import select

from db.migrate import alembic_config
from db.model_registry import register_bundle
from db.models import Job
from db.session import session_scope
from lightbox.synthetic import write_study
from scheduler.ingest.quarantine import digest
from scheduler.scheduling.dispatch import PassReport, dispatch_ready
from scheduler.scheduling.route import load_rules
from tests.conftest import Backend, run_cli
from worker.model_cache import ModelCache
from worker.process import run_job


def _run(backend: Backend, *args: str) -> str:
    out = run_cli(backend.env, *args)  # in process: the commands, not the processes, are tested
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_cli_ingest_results_status_models(sqlite_backend: Backend, model_bundle: Path,
                                          tmp_path: Path) -> None:
    backend = sqlite_backend
    heads = ",".join(sorted(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()))
    assert f"database at revision {heads}" in _run(backend, "db", "upgrade")
    with session_scope(backend.settings.sqlalchemy_url) as session:
        version = register_bundle(session, model_bundle, promote=True).version
    folder = tmp_path / "drop"
    rng = np.random.default_rng(11)
    studies = [write_study(folder, rng, label=i % 2, images=1) for i in range(4)]
    (folder / "junk.bin").write_bytes(b"\x00" * 300)
    counts = json.loads(_run(backend, "ingest", str(folder)))
    assert counts == {"registered": 4, "quarantined": 1}
    assert len(list(folder.iterdir())) == 5  # one-shot ingest copies, sources stay

    settings = backend.settings.model_copy(update={"quiet_seconds": 0.0})
    dispatch_ready(settings, load_rules(), PassReport())
    cache = ModelCache(settings, "onnxruntime")
    with session_scope(settings.sqlalchemy_url) as session:
        job_ids = list(session.scalars(select(Job.id)))
    assert [run_job(settings, cache, j) for j in job_ids] == ["succeeded"] * 4

    rows = json.loads(_run(backend, "results", "--format", "json"))
    assert len(rows) == 4 and {r["model_version"] for r in rows} == {version}
    scores = sorted(r["score"] for r in rows)
    cut = (scores[1] + scores[2]) / 2
    high = json.loads(_run(backend, "results", "--min-score", f"{cut}", "--format", "json"))
    assert sorted(r["score"] for r in high) == scores[2:]
    one = studies[0].study_instance_uid
    only = json.loads(_run(backend, "results", "--study", one, "--format", "json"))
    assert [r["study_instance_uid"] for r in only] == [one]
    assert json.loads(_run(backend, "results", "--label", "other", "--format", "json")) == []
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
    assert json.loads(_run(backend, "results", "--since", future, "--format", "json")) == []
    table = list(csv.DictReader(io.StringIO(_run(backend, "results", "--format", "csv"))))
    assert {r["sop_instance_uid"] for r in table} == {s.sop_instance_uids[0] for s in studies}
    assert "pneumonia" in _run(backend, "results")  # the human table

    status = json.loads(_run(backend, "status", "--format", "json"))
    assert status["jobs"]["succeeded"] == 4 and status["queue_depth"] == 0
    assert [q["code"] for q in status["quarantined"]] == ["not_dicom"]
    text = _run(backend, "status")
    assert digest(backend.settings, "junk.bin") in text and "not a DICOM" in text
    assert "junk.bin" not in text  # a file name can be a patient's name

    models = json.loads(_run(backend, "models", "list", "--format", "json"))
    assert [(m["name"], m["version"], m["stage"]) for m in models] == [
        ("chest", version, "production")]
    shown = json.loads(_run(backend, "models", "show", "chest", version))
    assert shown["manifest"]["labels"] == ["pneumonia"]
    assert set(shown["manifest"]["files"]) >= {"model.onnx"}
