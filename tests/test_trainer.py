"""The seed CNN trainer end to end on SYNTHETIC images: real training, real ONNX, real DB."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from db.model_registry import production_model, register_bundle
from db.models import ModelStage
from db.session import session_scope
from lightbox.errors import ManifestError
from lightbox.manifest import PreprocessSpec, load_manifest, sha256_file
from lightbox.settings import Settings
from trainer.export import PARITY_TOLERANCE, onnx_scores, torch_scores
from trainer.synthetic_dataset import synthetic_dataset
from trainer.train import TrainResult, auroc, stratified_split, train_seed_cnn, youden_threshold

IMAGES, EPOCHS, SEED = 320, 4, 0  # ~3 s of training on 2 cores; val AUROC ≈ 0.99


@pytest.fixture(scope="module")
def trained(settings: Settings) -> TrainResult:
    return train_seed_cnn(settings, images=IMAGES, epochs=EPOCHS, seed=SEED)


def test_bundle_is_complete_and_verifies(trained: TrainResult, settings: Settings) -> None:
    assert trained.bundle_dir == settings.models_dir / "chest" / trained.version
    assert sorted(p.name for p in trained.bundle_dir.iterdir()) == [
        "learning_curves.png", "manifest.json", "model.onnx", "roc.png"]
    manifest = load_manifest(trained.bundle_dir, verify=True)
    assert set(manifest.files) == {"learning_curves.png", "model.onnx", "roc.png"}
    assert manifest.plots == ["roc.png", "learning_curves.png"]
    assert manifest.cam_output is None  # the seed CNN has no global-pooling head
    assert manifest.threshold_policy == "youden"
    (tn, fp), (fn, tp) = manifest.confusion["pneumonia"]
    assert tn + fp + fn + tp == manifest.training_data["validation_images"]
    assert manifest.parity["max_abs_diff"] <= manifest.parity["bound"]
    assert manifest.version == trained.version
    assert (manifest.name, manifest.task, manifest.architecture) == ("chest", "binary", "seed_cnn")
    assert (manifest.input.height, manifest.input.width, manifest.input.name) == (64, 64, "image")
    assert manifest.output_name == "scores"
    assert manifest.preprocessing == PreprocessSpec()
    assert manifest.labels == ["pneumonia"]
    assert manifest.thresholds["pneumonia"] == pytest.approx(trained.metrics["threshold"])
    assert manifest.training_data["source"] == "synthetic"
    assert manifest.training_data["images"] == IMAGES
    assert manifest.training_data["positives"] == IMAGES // 2
    assert "SYNTHETIC" in str(manifest.training_data["note"])
    assert manifest.created_at


def test_metrics_are_recorded_and_good(trained: TrainResult) -> None:
    metrics = load_manifest(trained.bundle_dir).metrics
    assert metrics == trained.metrics
    assert metrics["auroc"] > 0.8
    assert 0.0 <= metrics["sensitivity"] <= 1.0 and 0.0 <= metrics["specificity"] <= 1.0
    assert metrics["sensitivity"] + metrics["specificity"] > 1.5
    assert 0.0 < metrics["threshold"] < 1.0
    assert metrics["parity_max_abs_diff"] <= PARITY_TOLERANCE


def test_onnx_matches_torch_on_fresh_images(trained: TrainResult) -> None:
    assert trained.manifest is not None and trained.model is not None
    x, y = synthetic_dataset(40, trained.manifest, seed=12345)  # never seen in training
    from_onnx = onnx_scores(trained.bundle_dir / "model.onnx", x)
    assert from_onnx.shape == (40, 1)
    np.testing.assert_allclose(from_onnx, torch_scores(trained.model, x), rtol=0, atol=1e-4)
    assert auroc(from_onnx, y) > 0.8  # and the exported model generalises


def test_onnx_is_one_file_with_dynamic_batch(trained: TrainResult) -> None:
    path = trained.bundle_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["scores"]
    for batch in (1, 5):
        images = np.random.default_rng(batch).standard_normal((batch, 1, 64, 64), np.float32)
        (scores,) = session.run(None, {"image": images})
        assert scores.shape == (batch, 1)
        assert np.all((scores >= 0) & (scores <= 1))


def test_trained_model_is_registered_in_production(
    trained: TrainResult, settings: Settings
) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        row = production_model(session, "chest")
        assert row is not None and row.id == trained.model_id
        assert row.version == trained.version and row.stage == ModelStage.production
        assert Path(row.bundle_path) == trained.bundle_dir


@pytest.mark.slow
def test_same_seed_gives_same_model(trained: TrainResult, settings: Settings) -> None:
    again = train_seed_cnn(settings, images=IMAGES, epochs=EPOCHS, seed=SEED, register=False)
    assert again.version != trained.version and again.model_id is None
    assert again.metrics == trained.metrics
    assert trained.model is not None and again.model is not None
    first, second = trained.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert sha256_file(again.bundle_dir / "model.onnx") == sha256_file(
        trained.bundle_dir / "model.onnx"
    )


def test_tampered_model_is_refused(trained: TrainResult, settings: Settings,
                                   tmp_path: Path) -> None:
    bundle = tmp_path / "tampered"
    shutil.copytree(trained.bundle_dir, bundle)
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the weights
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="model.onnx"):
        load_manifest(bundle, verify=True)
    with pytest.raises(ManifestError), session_scope(settings.sqlalchemy_url) as session:
        register_bundle(session, bundle, promote=True)


def test_synthetic_dataset_is_seeded_and_balanced(trained: TrainResult) -> None:
    assert trained.manifest is not None
    x, y = synthetic_dataset(10, trained.manifest, seed=7)
    assert x.shape == (10, 1, 64, 64) and x.dtype == np.float32
    assert y.shape == (10,) and y.dtype == np.float32 and y.sum() == 5
    x2, y2 = synthetic_dataset(10, trained.manifest, seed=7)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)


def test_auroc_and_youden() -> None:
    labels = np.array([0, 0, 1, 1])
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), labels) == pytest.approx(0.75)
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == pytest.approx(0.5)  # ties count ½
    assert auroc(np.array([0.1, 0.2, 0.3, 0.4]), labels) == pytest.approx(1.0)
    threshold, sensitivity, specificity = youden_threshold(np.array([0.1, 0.2, 0.3, 0.4]), labels)
    assert 0.2 < threshold <= 0.3 and (sensitivity, specificity) == (1.0, 1.0)


def test_split_is_stratified() -> None:
    labels = np.array([1.0] * 50 + [0.0] * 50)
    train, val = stratified_split(labels, 0.2, np.random.default_rng(0))
    assert len(val) == 20 and labels[val].sum() == 10
    assert not set(train) & set(val) and len(train) + len(val) == 100


@pytest.mark.slow
def test_parity_over_the_bound_fails_the_build(settings: Settings,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.export

    monkeypatch.setattr(trainer.export, "PARITY_TOLERANCE", -1.0)  # any difference is too much
    before = set((settings.models_dir / "parity").glob("*")) if (
        settings.models_dir / "parity").exists() else set()
    with pytest.raises(ManifestError, match="differs from torch"):
        train_seed_cnn(settings, name="parity", images=40, epochs=1, register=False)
    assert set((settings.models_dir / "parity").glob("*")) == before  # no half-written bundle
