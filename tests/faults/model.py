"""A tiny ONNX model bundle for the reliability tests (no training, builds in milliseconds).

Score = sigmoid(mean of the image). It **raises at run time** for a "poison" image, one whose
every pixel is at the top of its VOI window (prepared value ≥ 1.9): the per-image minimum then
turns the final Reshape's target shape into (-1, 1000001), which no batch size fills, so ONNX
Runtime fails the whole call. :func:`write_poison_study` writes such an image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, save_model
from pydicom.uid import generate_uid

from db.model_registry import register_bundle
from db.session import session_scope
from lightbox.manifest import InputSpec, Manifest, PreprocessSpec, write_bundle_manifest
from lightbox.synthetic import SyntheticStudy, cr_dataset
from tests.conftest import Backend

SIZE = 32
POISON_MIN = 1.9


def _graph() -> helper.GraphProto:
    c = helper.make_tensor
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Sigmoid", ["mean"], ["score_flat"]),
        helper.make_node("ReduceMin", ["image"], ["minimum"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Greater", ["minimum", "poison"], ["is_poison"]),
        helper.make_node("Cast", ["is_poison"], ["poison_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["poison_f"], ["any_poison"], axes=[0], keepdims=1),
        helper.make_node("Mul", ["any_poison", "big"], ["scaled"]),
        helper.make_node("Add", ["scaled", "one"], ["width_f"]),
        helper.make_node("Cast", ["width_f"], ["width"], to=TensorProto.INT64),
        helper.make_node("Concat", ["minus_one", "width"], ["shape"], axis=0),
        helper.make_node("Reshape", ["score_flat", "shape"], ["scores"]),
    ]
    inits = [c("poison", TensorProto.FLOAT, [], [POISON_MIN]),
             c("big", TensorProto.FLOAT, [1], [1_000_000.0]),
             c("one", TensorProto.FLOAT, [1], [1.0]),
             c("minus_one", TensorProto.INT64, [1], [-1])]
    return helper.make_graph(
        nodes, "reliability-tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 1])], inits)


def build_bundle(directory: Path, name: str = "chest", version: str = "tiny-1") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(_graph(), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save_model(model, str(directory / "model.onnx"))
    manifest = Manifest(
        name=name, version=version, architecture="reliability-tiny",
        input=InputSpec(height=SIZE, width=SIZE), preprocessing=PreprocessSpec(),
        labels=["finding"], thresholds={"finding": 0.5},
        training_data={"note": "not trained: a test fixture"},
    )
    write_bundle_manifest(directory, manifest)
    return directory


def write_poison_study(out_dir: Path) -> SyntheticStudy:
    """One CR whose pixels all sit at the top of its window: the tiny model raises on it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = np.full((64, 64), 4000, dtype=np.uint16)
    study_uid, series_uid = generate_uid(), generate_uid()
    ds = cr_dataset(stored, study_uid=study_uid, series_uid=series_uid, monochrome1=False,
                    label=0, patient_id="POISON")
    ds.WindowCenter, ds.WindowWidth = 2000, 100
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return SyntheticStudy(study_uid, (str(ds.SOPInstanceUID),), 0, (path,))


@pytest.fixture(scope="session", name="tiny_bundle")
def tiny_bundle_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("tiny-model") / "bundle")


@pytest.fixture(name="tiny_model")
def tiny_model_fixture(backend: Backend, tiny_bundle: Path) -> int:
    """The tiny bundle registered and promoted as ``chest`` in this backend's database."""
    with session_scope(backend.settings.sqlalchemy_url) as session:
        return register_bundle(session, tiny_bundle, promote=True).id
