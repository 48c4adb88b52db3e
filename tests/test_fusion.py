"""Late-fusion heads (issue 23, item 5): a metadata model that also takes an image model's
score on the same file. Trained through `lightbox train --kind tabular --fuse-with`, run
through the real queue on SQLite and PostgreSQL, compared with the header-only model on the
same held-out files of a SYNTHETIC task that needs both the header and the image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from db.model_registry import register_bundle
from db.models import Job, JobState
from db.queries import findings
from db.session import session_scope
from lightbox.celery_app import make_celery
from lightbox.manifest import load_manifest
from lightbox.tabular import encode, fused_input, read_header
from scheduler.ingest.registration import register_file
from scheduler.scheduling.dispatch import PassReport, dispatch_ready, send_pending
from scheduler.scheduling.route import load_rules
from tests.conftest import Backend, run_worker_until_done
from trainer.export import onnx_scores
from trainer.tabular import FUSION_LABEL, image_model_scores, write_fusion_files
from worker.model_cache import ModelCache
from worker.process import run_job

HEAD_OPTIONS = ["--kind", "tabular", "--name", "admit", "--epochs", "40", "--lr", "0.01",
                "--batch-size", "32", "--patience", "8", "--test-fraction", "0.25", "--json"]


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LIGHTBOX_DATA_DIR": str(data_dir)}
    env.pop("LIGHTBOX_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory,
          model_bundle: Path) -> tuple[dict[str, object], dict[str, object]]:
    """(header-only report, fused report) of `lightbox train --json`, on the same 400
    SYNTHETIC files and the same held-out quarter; the image model is the shared seed CNN."""
    root = tmp_path_factory.mktemp("fusion")
    data_dir = root / "data"
    labels = write_fusion_files(root / "files", 400, seed=4)
    out = _cli(data_dir, "models", "register", str(model_bundle), "--promote")
    assert out.returncode == 0, out.stderr
    reports = []
    for extra in ([], ["--fuse-with", "chest"]):
        out = _cli(data_dir, "train", *HEAD_OPTIONS, "--data", str(labels.parent),
                   "--labels-csv", str(labels), "--version", "fused" if extra else "header",
                   *extra)
        assert out.returncode == 0, out.stderr[-3000:]
        reports.append({**json.loads(out.stdout), "data_dir": str(data_dir)})  # pure JSON
    return reports[0], reports[1]


def test_fusion_helps_on_a_task_that_needs_the_image(
        heads: tuple[dict[str, object], dict[str, object]], model_bundle: Path) -> None:
    header_only, fused = heads
    image = load_manifest(model_bundle)
    assert header_only["fuse_with"] is None
    assert fused["fuse_with"] == {"model": "chest", "version": image.version,
                                  "scores": ["pneumonia"]}
    manifest = load_manifest(Path(str(fused["bundle"])))
    assert manifest.kind == "tabular" and manifest.labels == [FUSION_LABEL]
    assert manifest.input.channels == sum(f.width for f in manifest.features) + 1
    assert "paths" not in manifest.training_data and "headers" not in manifest.training_data
    a = header_only["metrics"]["test_accuracy"]  # type: ignore[index]
    b = fused["metrics"]["test_accuracy"]  # type: ignore[index]
    print(f"held-out accuracy (100 files): header only {a:.3f}, fused {b:.3f}")
    assert b > a + 0.05, (a, b)  # the image's opacity is half of the rule
    assert fused["metrics"]["test_auroc"] > header_only["metrics"]["test_auroc"]  # type: ignore[index]


def test_fused_model_end_to_end(backend: Backend, model_bundle: Path,
                                heads: tuple[dict[str, object], dict[str, object]],
                                tmp_path: Path) -> None:
    """Queue → image model → fusion head, one finding per image (the head's only), scores
    equal to the trainer's offline computation; files missing every header value still get
    a decided finding; header values stay out of the log and the database."""
    head_dir = Path(str(heads[1]["bundle"]))
    head = load_manifest(head_dir)
    settings = backend.settings.model_copy(update={"quiet_seconds": 0.0})
    backend.settings = settings
    with session_scope(settings.sqlalchemy_url) as session:
        register_bundle(session, model_bundle, promote=True)
        register_bundle(session, head_dir, promote=True)
    labels = write_fusion_files(tmp_path / "in", 10, seed=31)
    paths = sorted(labels.parent.glob("*.dcm"))
    bare = pydicom.dcmread(paths[0])
    for spec in head.features:
        if spec.keyword in bare:
            delattr(bare, spec.keyword)
    bare.save_as(paths[0], enforce_file_format=True)
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: triage\n    match:\n      Modality: [CR]\n"
                     "    models: [admit]\n")
    for path in paths:
        register_file(settings, path)
    dispatch_ready(settings, load_rules(rules), PassReport())
    send_pending(settings, make_celery(settings), PassReport())
    run_worker_until_done(backend, len(paths), tmp_path / "worker.log", "fusion jobs done")
    with session_scope(settings.sqlalchemy_url) as session:
        assert {j.state for j in session.scalars(select(Job))} == {JobState.succeeded}
        rows = findings(session)
    assert len(rows) == len(paths) and {r["label"] for r in rows} == {FUSION_LABEL}
    assert all(r["synthetic"] for r in rows)  # its image model was trained on SYNTHETIC data
    _, image_scores = image_model_scores(model_bundle, [str(p) for p in paths])
    keywords = [f.keyword for f in head.features]
    x = np.stack([fused_input(encode(read_header(p, keywords), head.features), s, head)
                  for p, s in zip(paths, image_scores, strict=True)])
    offline = onnx_scores(head_dir / "model.onnx", x)[:, 0]
    uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: i
           for i, p in enumerate(paths)}
    for row in rows:
        assert row["score"] == pytest.approx(float(offline[uid[row["sop_instance_uid"]]]),
                                             abs=1e-4)
    stored = json.dumps(rows, default=str)
    assert "KVP" not in stored and "PatientAge" not in stored
    log = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in log and "KVP" not in log and "Exposure" not in log


def test_fusion_head_without_its_image_model_fails_its_job(
        sqlite_backend: Backend, heads: tuple[dict[str, object], dict[str, object]],
        tmp_path: Path) -> None:
    """The image version a head was trained on is not registered here: the job fails with a
    message naming it, and nothing is written."""
    settings = sqlite_backend.settings.model_copy(update={"quiet_seconds": 0.0,
                                                          "job_max_attempts": 1})
    with session_scope(settings.sqlalchemy_url) as session:
        register_bundle(session, Path(str(heads[1]["bundle"])), promote=True)
    labels = write_fusion_files(tmp_path / "in", 1, seed=5)
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: triage\n    match:\n      Modality: [CR]\n"
                     "    models: [admit]\n")
    register_file(settings, next(labels.parent.glob("*.dcm")))
    dispatch_ready(settings, load_rules(rules), PassReport())
    with session_scope(settings.sqlalchemy_url) as session:
        job_id = session.scalar(select(Job.id))
    assert run_job(settings, ModelCache(settings, "onnxruntime"), job_id) != "succeeded"
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        assert job is not None and "needs image model chest" in (job.error_detail or "")
        assert findings(session) == []


def test_compile_refuses_a_metadata_bundle(heads: tuple[dict[str, object], dict[str, object]],
                                           tmp_path: Path) -> None:
    bundle = Path(str(heads[0]["bundle"]))
    before = load_manifest(bundle).files
    out = _cli(tmp_path / "data", "compile", str(bundle))
    assert out.returncode == 1
    # One error line (besides the log lines of the start-up: data dir, migrations).
    message = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(message) == 1 and "metadata (tabular) model: nothing to compile" in message[0]
    assert "Traceback" not in out.stderr
    assert load_manifest(bundle).files == before  # nothing added



def test_fused_candidate_compared_with_header_only_production(
        heads: tuple[dict[str, object], dict[str, object]]) -> None:
    """`lightbox models promote` scores a fusion head on its held-out files with its image
    model's scores, and the header-only production version on the same files."""
    data_dir = Path(str(heads[0]["data_dir"]))
    out = _cli(data_dir, "models", "promote", "admit", "header")
    assert out.returncode == 0, out.stderr
    out = _cli(data_dir, "models", "promote", "admit", "fused")
    assert out.returncode == 0, out.stderr
    assert "held-out test set of fused (100 images)" in out.stderr
    assert "now production" in out.stdout
    back = _cli(data_dir, "models", "promote", "admit", "header")  # worse: refused
    assert back.returncode == 1 and "refused" in back.stderr
