"""Training data: RSNA layout, class folders, the prepared-image cache, patient-level splits,
and an RSNA-layout dataset (SYNTHETIC images) trained end to end into a verified bundle."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lightbox.manifest import load_manifest
from lightbox.preprocess import prepare_file
from lightbox.settings import Settings
from trainer.datasets import folder_source, load_source, open_source, rsna_source
from trainer.export import onnx_scores
from trainer.metrics import choose_threshold, confusion, sensitivity_threshold
from trainer.splits import balance_report, patient_split
from trainer.synthetic_dataset import write_class_folders, write_rsna_layout
from trainer.train import TrainConfig, draft_manifest, train_model

PATIENTS = 48


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rsna_layout(tmp_path_factory.mktemp("rsna"), PATIENTS, seed=3, size=80)


def _csv_targets(root: Path) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    with (root / "stage_2_train_labels.csv").open() as handle:
        for row in csv.DictReader(handle):
            rows.setdefault(row["patientId"], []).append(int(row["Target"]))
    return rows


def test_rsna_rows_collapse_to_one_label_per_patient(rsna_root: Path) -> None:
    rows = _csv_targets(rsna_root)
    assert len(rows) == PATIENTS
    assert any(len(v) > 1 for v in rows.values())  # several box rows for some patients
    source = open_source(rsna_root)
    assert (source.kind, source.task, source.labels) == ("rsna", "binary", ["pneumonia"])
    assert len(source.items) == PATIENTS
    assert source.describe["csv_rows"] == sum(len(v) for v in rows.values())
    by_file = {item.path.stem: item.target[0] for item in source.items}
    assert by_file == {pid: float(max(v)) for pid, v in rows.items()}
    assert 0 < sum(by_file.values()) < PATIENTS


def test_prepared_cache_uses_the_worker_preprocessing(rsna_root: Path, tmp_path: Path) -> None:
    manifest = draft_manifest(TrainConfig())
    source = rsna_source(rsna_root)
    first = load_source(source, manifest, tmp_path / "cache")
    assert first.summary["cache"] == {"hits": 0, "misses": PATIENTS}
    again = load_source(source, manifest, tmp_path / "cache")
    assert again.summary["cache"] == {"hits": PATIENTS, "misses": 0}
    np.testing.assert_array_equal(first.x, again.x)
    item = source.items[5]
    np.testing.assert_array_equal(first.x[5], prepare_file(item.path, manifest))
    assert first.x.shape == (PATIENTS, 1, 64, 64)
    assert first.summary["source_image_sizes"] == ["80x80"]
    bigger = draft_manifest(TrainConfig(input_size=32))  # another spec misses the cache
    assert load_source(source, bigger, tmp_path / "cache").summary["cache"]["misses"] == PATIENTS


def test_bad_files_are_skipped_not_fatal(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "classes", {"normal": 4, "opacity": 4}, seed=1, size=64)
    (root / "opacity" / "broken.dcm").write_bytes(b"DICM but not really")
    source = folder_source(root)
    assert (source.task, source.labels) == ("binary", ["opacity"])
    data = load_source(source, draft_manifest(TrainConfig()), tmp_path / "cache")
    assert len(data) == 8 and sum(data.summary["skipped"].values()) == 1
    assert data.y.sum() == 4


def test_class_folders_with_three_classes_are_multiclass(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "c", {"a": 3, "b": 3, "c": 3}, seed=2, size=64)
    source = folder_source(root)
    assert (source.task, source.labels) == ("multiclass", ["a", "b", "c"])
    assert all(sum(item.target) == 1.0 for item in source.items)


def test_patient_split_has_no_leakage_and_is_stratified(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "c", {"normal": 40, "opacity": 40}, seed=4, size=64,
                               patients_per_image=0.4)
    data = load_source(folder_source(root), draft_manifest(TrainConfig()), tmp_path / "cache")
    assert len(np.unique(data.patients)) < len(data)  # some patients have several images
    split = patient_split(data.patients, data.y, val_fraction=0.25, test_fraction=0.2, seed=9)
    sets = {name: set(data.patients[index]) for name, index in split.items()}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert sum(len(index) for _, index in split.items()) == len(data)
    report = balance_report(data.y, data.patients, data.labels, split)
    assert all(report[name]["opacity"] > 0 for name in ("train", "validation", "test"))
    assert report["validation"]["patients"] == len(sets["validation"])
    again = patient_split(data.patients, data.y, val_fraction=0.25, test_fraction=0.2, seed=9)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(split.items(), again.items(),
                                                                 strict=True))
    other = patient_split(data.patients, data.y, val_fraction=0.25, test_fraction=0.2, seed=10)
    assert not np.array_equal(split.validation, other.validation)


def test_threshold_policies() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    labels = np.array([0, 0, 1, 0, 1, 0, 1, 1])
    threshold, sensitivity, _ = sensitivity_threshold(scores, labels, 1.0)
    assert 0.2 < threshold <= 0.3 and sensitivity == 1.0
    threshold, sensitivity, specificity = choose_threshold(scores, labels, "sensitivity:0.5")
    assert threshold > 0.6 and sensitivity == 0.5 and specificity == 1.0
    assert confusion(scores, labels, threshold) == [[4, 0], [2, 2]]
    with pytest.raises(ValueError):
        choose_threshold(scores, labels, "median")


@pytest.mark.slow
def test_rsna_layout_trains_end_to_end(rsna_root: Path, settings: Settings) -> None:
    config = TrainConfig(name="rsna", epochs=2, batch_size=16, seed=1,
                         threshold_policy="sensitivity:0.9")
    from trainer.train import load_training_data

    data = load_training_data(settings, config, data=rsna_root)
    result = train_model(settings, data, config, register=True, promote=False)
    manifest = load_manifest(result.bundle_dir, verify=True)
    assert manifest.training_data["kind"] == "rsna"
    assert manifest.threshold_policy == "sensitivity:0.9"
    assert manifest.training_data["images"] == PATIENTS
    balance = manifest.training_data["balance"]
    assert sum(balance[s]["patients"] for s in ("train", "validation", "test")) == PATIENTS
    assert balance["validation"]["pneumonia"] > 0
    text = (result.bundle_dir / "manifest.json").read_text()
    assert not any(pid in text for pid in _csv_targets(rsna_root))  # no patient IDs anywhere
    assert "patients" not in json.loads(text)["training_data"]
    x = data.x[:4]
    assert onnx_scores(result.bundle_dir / "model.onnx", x).shape == (4, 1)
    assert result.model_id is not None


@pytest.mark.slow
def test_train_command_on_rsna_layout(rsna_root: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "LIGHTBOX_DATA_DIR": str(tmp_path / "data")}
    env.pop("LIGHTBOX_DATABASE_URL", None)
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "train", "--data", str(rsna_root), "--name",
         "rsna", "--epochs", "1", "--batch-size", "16", "--version", "v1", "--json"],
        env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)  # --json: stdout is the JSON document only
    assert report["version"] == "v1" and report["balance"]["train"]["images"] > 0
    assert report["stage"] == "staging" and report["monitor"] == "val_loss"
    assert "epoch 1/1: train loss" in out.stderr  # the per-epoch line, no terminal attached
    listed = subprocess.run([sys.executable, "-m", "cli.main", "models", "list", "--format",
                             "json"], env=env, capture_output=True, text=True, timeout=120)
    assert [(m["name"], m["version"], m["stage"]) for m in json.loads(listed.stdout)] == [
        ("rsna", "v1", "staging")]
    bad = subprocess.run(
        [sys.executable, "-m", "cli.main", "train", "--data", str(tmp_path), "--epochs", "1"],
        env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "class folders" in bad.stderr  # clear error, no traceback
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_multilabel_csv_trains_with_one_threshold_per_label(tmp_path: Path,
                                                           settings: Settings) -> None:
    from lightbox.synthetic import write_study
    from trainer.datasets import csv_source

    rng = np.random.default_rng(8)
    rows = ["file,patient,opacity,effusion"]
    for n in range(40):
        opacity, effusion = n % 2, (n // 2) % 2  # SYNTHETIC: only opacity is visible
        study = write_study(tmp_path / "img", rng, label=opacity, size=64, patient_id=f"P{n}")
        rows.append(f"{study.paths[0].name},P{n // 2},{opacity},{effusion}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    source = csv_source(tmp_path / "img", tmp_path / "labels.csv")
    assert (source.task, source.labels) == ("multilabel", ["opacity", "effusion"])
    config = TrainConfig(name="multi", epochs=2, batch_size=8, patience=0)
    data = load_source(source, draft_manifest(config), tmp_path / "cache")
    result = train_model(settings, data, config, register=False)
    manifest = load_manifest(result.bundle_dir)
    assert manifest.task == "multilabel" and set(manifest.thresholds) == {"opacity", "effusion"}
    assert set(manifest.confusion) == {"opacity", "effusion"}
    assert {"auroc_opacity", "auroc_effusion"} <= set(manifest.metrics)
    scores = onnx_scores(result.bundle_dir / "model.onnx", data.x[:5])
    assert scores.shape == (5, 2) and np.all((scores >= 0) & (scores <= 1))
