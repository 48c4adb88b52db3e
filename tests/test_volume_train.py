"""3-D models on SYNTHETIC phantoms (trainer/volume_train.py): MONAI networks, ONNX export with
parity, volume manifest fields, registration; the bundle runs in ONNX Runtime on a batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from db.migrate import upgrade
from db.model_registry import production_model
from db.session import session_scope
from lightbox.manifest import load_manifest
from lightbox.settings import Settings
from trainer.export import onnx_outputs
from trainer.volume_train import ROI, synthetic_volumes, train_volume_model, volume_spec


@pytest.mark.slow  # training is the point
@pytest.mark.parametrize("kind", ["segmentation", "classification"])
def test_volume_model_bundle(tmp_path: Path, kind: str) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings.sqlalchemy_url)
    result = train_volume_model(settings, kind, volumes=10, steps=2, batch=2)  # type: ignore[arg-type]
    manifest = load_manifest(result.bundle_dir, verify=True)
    assert manifest.volume is not None and manifest.volume.roi_size == ROI
    assert manifest.volume.output == kind
    assert manifest.training_data["synthetic"] is True
    assert "SYNTHETIC" in str(manifest.training_data["note"])
    assert manifest.parity["max_abs_diff"] <= manifest.parity["bound"]
    assert manifest.input.depth == ROI[0]
    with session_scope(settings.sqlalchemy_url) as session:
        model = production_model(session, manifest.name)
        assert model is not None and model.id == result.model_id
    x, _, _ = synthetic_volumes(3, seed=9, spec=volume_spec(kind))  # type: ignore[arg-type]
    out = onnx_outputs(result.bundle_dir / "model.onnx", x)[0]
    assert out.shape == ((3, 1, *ROI) if kind == "segmentation" else (3, 1))
    assert np.all((out >= 0) & (out <= 1))


def test_synthetic_volumes_are_windowed_and_labelled() -> None:
    x, masks, labels = synthetic_volumes(6, seed=1, spec=volume_spec("segmentation"))
    assert x.min() >= 0 and x.max() <= 1
    assert labels.sum() == 3
    assert all(bool(m.any()) == bool(label) for m, label in zip(masks, labels, strict=True))
    # Lesion voxels are brighter than the tissue around them after the window.
    assert x[masks > 0].mean() > x[(masks == 0) & (x > 0.2) & (x < 0.6)].mean()
