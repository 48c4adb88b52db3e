"""Architectures and heads, the class-activation-map output, resumable training, and a
promotion reaching a running worker (seed CNN v1 → MONAI ResNet18 v2), all on SYNTHETIC data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sqlalchemy import select

from db.model_registry import list_models, register_bundle
from db.models import Finding, Job, JobState, ModelStage, Study
from db.session import session_scope
from lightbox.manifest import load_manifest
from lightbox.preprocess import prepare_file
from lightbox.settings import Settings
from lightbox.synthetic import write_study
from scheduler.ingest.folder import ingest_paths
from tests.conftest import Backend, stop_processes, wait_for
from trainer.architectures import GapClassifier, Scorer, build_network
from trainer.export import PARITY_TOLERANCE, onnx_scores
from trainer.synthetic_dataset import synthetic_set
from trainer.train import TrainConfig, TrainResult, draft_manifest, train_model


@pytest.fixture(scope="module")
def resnet(settings: Settings) -> TrainResult:
    """MONAI ResNet18, one-channel input, a few steps on SYNTHETIC images."""
    config = TrainConfig(name="chest", architecture="resnet18", epochs=1, batch_size=16,
                         patience=0, version="v2-resnet18")
    data = synthetic_set(48, draft_manifest(config), seed=5)
    return train_model(settings, data, config, register=False)


def test_monai_network_exports_scores_and_cam(resnet: TrainResult) -> None:
    manifest = load_manifest(resnet.bundle_dir, verify=True)
    assert manifest.architecture == "resnet18" and manifest.cam_output == "cam"
    assert manifest.parity["max_abs_diff"] <= PARITY_TOLERANCE
    assert manifest.parity["cam_max_abs_diff"] <= manifest.parity["cam_bound"]
    session = ort.InferenceSession(str(resnet.bundle_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["scores", "cam"]
    for batch in (1, 3):  # dynamic batch axis
        x = np.random.default_rng(batch).standard_normal((batch, 1, 64, 64), np.float32)
        scores, cam = session.run(None, {"image": x})
        assert scores.shape == (batch, 1) and cam.shape == (batch, 1, 4, 4)  # 64 / 16
        # The map explains the score: its spatial mean is the logit.
        logit = cam.mean(axis=(2, 3))
        np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logit)), atol=1e-5)


@pytest.mark.slow  # builds and runs a DenseNet-121
def test_densenet121_cam_is_its_logit_map() -> None:
    torch.manual_seed(0)
    network = build_network("densenet121", 3, 64)
    assert isinstance(network, GapClassifier)
    network.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        logits, cam = network.cam(x)
        torch.testing.assert_close(logits, network(x), atol=1e-5, rtol=1e-5)
        probabilities, cam_out = Scorer(network, "multiclass")(x)
    assert cam.shape == (2, 3, 2, 2) and torch.equal(cam, cam_out)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2))  # softmax head


def test_heads() -> None:
    network = build_network("seed_cnn", 3, 64)
    x = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        multilabel = Scorer(network, "multilabel")(x)
        multiclass = Scorer(network, "multiclass")(x)
    assert isinstance(multilabel, torch.Tensor) and multilabel.shape == (4, 3)
    assert not torch.allclose(multilabel.sum(1), torch.ones(4))  # independent sigmoids
    torch.testing.assert_close(multiclass.sum(1), torch.ones(4))
    with pytest.raises(ValueError):
        build_network("vgg", 1, 64)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_model(settings: Settings, tmp_path: Path) -> None:
    config = TrainConfig(name="resume", epochs=3, batch_size=16, patience=0, seed=2)
    data = synthetic_set(80, draft_manifest(config), seed=2)
    straight = train_model(settings, data, config, register=False,
                           checkpoint_dir=tmp_path / "a")

    def crash(stage: str, done: int, total: int) -> None:
        if stage == "epoch 3/3":
            raise KeyboardInterrupt  # the operator's Ctrl-C, or a lost node

    with pytest.raises(KeyboardInterrupt):
        train_model(settings, data, config, register=False, checkpoint_dir=tmp_path / "b",
                    progress=crash)
    assert list((tmp_path / "b").glob("checkpoint-*.pt"))
    resumed = train_model(settings, data, config, register=False, resume=True,
                          checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_from_epoch == 2 and straight.resumed_from_epoch == 0
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0, 3.0]
    assert resumed.metrics == straight.metrics
    assert straight.model is not None and resumed.model is not None
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "b").glob("checkpoint-*.pt"))  # removed once the bundle exists


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epoch(settings: Settings, tmp_path: Path) -> None:
    config = TrainConfig(name="early", epochs=12, batch_size=16, patience=1, seed=0,
                         learning_rate=3e-3)
    data = synthetic_set(80, draft_manifest(config), seed=0)
    result = train_model(settings, data, config, register=False, checkpoint_dir=tmp_path)
    runs = len(result.history)
    assert runs < 12  # stopped before the last epoch
    best = min(result.history, key=lambda h: (h["val_loss"], -h["auroc"]))
    assert result.metrics["best_epoch"] == best["epoch"]
    assert result.metrics["epochs_run"] == runs
    assert result.history[-1]["epoch"] == result.metrics["best_epoch"] + 1


def _finished_job(url: str, study_uid: str) -> tuple[int, int] | None:
    """(job id, model id) once the study's job succeeded."""
    with session_scope(url) as session:
        row = session.execute(
            select(Job.id, Job.model_id, Job.state).join(Study, Job.study_id == Study.id)
            .where(Study.study_instance_uid == study_uid)).first()
    if row is None or row.state != JobState.succeeded:
        assert row is None or row.state in (JobState.queued, JobState.running), row
        return None
    return row.id, row.model_id


@pytest.mark.slow
def test_promotion_reaches_a_running_worker(
    backend: Backend, registered_model: tuple[int, str], resnet: TrainResult, tmp_path: Path
) -> None:
    v1_id, _ = registered_model  # the seed CNN (conftest), production
    url = backend.settings.sqlalchemy_url
    logs = tmp_path / "logs"
    logs.mkdir()
    worker = backend.spawn("worker", log=logs / "worker.log")
    procs = [worker, backend.spawn("scheduler", log=logs / "scheduler.log")]
    rng = np.random.default_rng(11)
    try:
        first = write_study(tmp_path / "a", rng, label=1, size=128)
        ingest_paths(backend.settings, [tmp_path / "a"])
        _, model_id = wait_for(lambda: _finished_job(url, first.study_instance_uid), 120,
                               what="v1 job")
        assert model_id == v1_id

        with session_scope(url) as session:
            v2_id = register_bundle(session, resnet.bundle_dir, promote=True).id
        second = write_study(tmp_path / "b", rng, label=1, size=128)
        ingest_paths(backend.settings, [tmp_path / "b"])
        job_id, model_id = wait_for(lambda: _finished_job(url, second.study_instance_uid), 120,
                                    what="v2 job")
        assert model_id == v2_id != v1_id
        assert worker.poll() is None  # the same worker process, never restarted

        with session_scope(url) as session:
            finding = session.scalars(select(Finding).where(Finding.job_id == job_id)).one()
            stages = {m.version: m.stage for m in list_models(session)}
        assert resnet.manifest is not None
        expected = onnx_scores(resnet.bundle_dir / "model.onnx",
                               prepare_file(second.paths[0], resnet.manifest)[None])
        assert finding.score == pytest.approx(float(expected[0, 0]), abs=1e-5)  # v2's score
        assert finding.threshold == pytest.approx(resnet.manifest.thresholds["pneumonia"])
        assert stages["v2-resnet18"] == ModelStage.production
        assert list(stages.values()).count(ModelStage.production) == 1
    finally:
        stop_processes(procs)
    log = (logs / "worker.log").read_text()
    assert "Traceback" not in log, log[-3000:]
