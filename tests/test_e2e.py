"""End to end with real processes: DICOM files dropped into a watched folder come out as
findings rows, through a real `lightbox watch`, `lightbox scheduler` and `lightbox worker`
(Celery) on real Redis, against SQLite + embedded Redis and PostgreSQL + external Redis."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db.models import Finding, Instance, Job, JobState, QuarantinedFile, Study, StudyStatus
from db.session import session_scope
from lightbox.synthetic import real_chest_crs, write_ct_study, write_study
from scheduler.ingest.quarantine import digest
from tests.conftest import Backend, run_cli, stop_processes, wait_for


def _drop(staging: Path, inbox: Path) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, inbox / path.name)


def _cli_json(backend: Backend, *args: str) -> object:
    out = run_cli(backend.env, *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_watched_folder_to_findings(backend: Backend, registered_model: tuple[int, str],
                                    tmp_path: Path) -> None:
    model_id, model_version = registered_model
    settings = backend.settings
    staging, inbox, logs = tmp_path / "staging", tmp_path / "inbox", tmp_path / "logs"
    logs.mkdir()
    rng = np.random.default_rng(7)
    synthetic = [write_study(staging, rng, label=i % 2, images=1 + (i == 0), size=256)
                 for i in range(4)]
    real_uid, real_paths = real_chest_crs(staging)
    ct_uid = write_ct_study(staging)
    (staging / "report.txt").write_text("not DICOM")
    whole = synthetic[1].paths[0].read_bytes()
    (staging / "cut.dcm").write_bytes(whole[:3000])
    pixel_bytes = 256 * 256 * 2  # the last element: its value ends the file
    cut_reason = (f"file truncated: element (7FE0,0010) has "
                  f"{3000 - (len(whole) - pixel_bytes)} of {pixel_bytes} bytes")
    expected = {s.study_instance_uid: set(s.sop_instance_uids) for s in synthetic}
    procs = [backend.spawn("worker", log=logs / "worker.log"),
             backend.spawn("scheduler", log=logs / "scheduler.log"),
             backend.spawn("watch", str(inbox), log=logs / "watch.log")]
    try:
        _drop(staging, inbox)
        url = settings.sqlalchemy_url

        def finished() -> bool:
            with session_scope(url) as session:
                studies = session.scalars(select(Study)).all()
                if len(studies) < len(expected) + 2:
                    return False
                if any(s.status == StudyStatus.receiving for s in studies):
                    return False
                jobs = session.scalars(select(Job)).all()
                return bool(jobs) and all(j.state.terminal for j in jobs)

        wait_for(finished, timeout=180, what=f"all studies processed ({backend.name})")
        with session_scope(url) as session:
            with session_scope(url) as s2:
                real_sops = {i.sop_instance_uid for i in s2.scalars(
                    select(Instance).join(Instance.series).join(Study).where(
                        Study.study_instance_uid == real_uid))}
            expected[real_uid] = real_sops
            jobs = session.scalars(select(Job)).all()
            assert {j.state for j in jobs} == {JobState.succeeded}
            assert len(jobs) == len(expected)  # one job per routed study, the CT has none
            rows = session.execute(
                select(Study.study_instance_uid, Finding.sop_instance_uid, Finding.label,
                       Finding.score, Finding.positive, Finding.threshold, Job.model_id)
                .join(Job, Finding.job_id == Job.id).join(Study, Finding.study_id == Study.id)
            ).all()
            ct = session.scalars(select(Study).where(Study.study_instance_uid == ct_uid)).one()
            assert ct.status == StudyStatus.unrouted
            quarantined = {q.name_digest: q.reason for q in session.scalars(
                select(QuarantinedFile))}
        assert len(real_sops) == 2
        found: dict[str, set[str]] = {}
        for study_uid, sop_uid, label, score, positive, threshold, row_model in rows:
            assert label == "pneumonia" and row_model == model_id
            assert 0.0 <= score <= 1.0 and positive == (score >= threshold)
            found.setdefault(study_uid, set()).add(sop_uid)
        assert found == expected  # every instance of every routed study, exactly once
        assert len(rows) == sum(len(v) for v in expected.values())
        assert quarantined == {
            digest(settings, "report.txt"):
                "not a DICOM Part 10 file (no 'DICM' prefix or file meta)",
            digest(settings, "cut.dcm"): cut_reason}
        assert not list(inbox.rglob("*"))  # everything was taken out of the inbox

        results = _cli_json(backend, "results", "--format", "json")
        assert isinstance(results, list)
        assert {r["study_instance_uid"] for r in results} == set(expected)
        assert {r["model_version"] for r in results} == {model_version}
        real = _cli_json(backend, "results", "--study", real_uid, "--format", "json")
        assert isinstance(real, list) and {r["sop_instance_uid"] for r in real} == real_sops
        status = _cli_json(backend, "status", "--format", "json")
        assert isinstance(status, dict)
        assert status["jobs"]["succeeded"] == len(expected)
        assert status["queue_depth"] == 0
        assert status["quarantined_total"] == 2
        assert status["workers"] and status["workers"][0]["runtime"] == "onnxruntime"
    finally:
        stop_processes(procs)
    for name in ("worker", "scheduler", "watch"):
        log = (logs / f"{name}.log").read_text()
        assert "Traceback" not in log, f"{name} log has a traceback:\n{log[-3000:]}"
