"""The model registry on a real (SQLite) database with real, hash-verified bundles."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Event, Model, ModelStage
from db.registry import list_models, production_model, promote, register_bundle
from db.session import session_scope
from lightbox.errors import ManifestError, ModelNotFoundError
from lightbox.manifest import InputSpec, Manifest, PreprocessSpec, write_bundle_manifest


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'lightbox.db'}"
    upgrade(url)
    return url


def tiny_bundle(models_dir: Path, name: str, version: str) -> Path:
    """A real but trivial model (mean intensity → sigmoid), enough for the registry."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0),
         helper.make_node("Sigmoid", ["mean"], ["scores"])],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 64, 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 1])],
    )
    bundle = models_dir / name / version
    bundle.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(bundle / "model.onnx"))
    write_bundle_manifest(bundle, Manifest(
        name=name, version=version, architecture="tiny", input=InputSpec(height=64, width=64),
        preprocessing=PreprocessSpec(), labels=["pneumonia"], thresholds={"pneumonia": 0.5},
    ))
    return bundle


def stages(url: str, name: str = "chest") -> dict[str, ModelStage]:
    with session_scope(url) as session:
        return {m.version: m.stage for m in list_models(session) if m.name == name}


def test_register_promote_retire(url: str, tmp_path: Path) -> None:
    v1 = tiny_bundle(tmp_path / "models", "chest", "20260101T000000Z")
    v2 = tiny_bundle(tmp_path / "models", "chest", "20260102T000000Z")
    with session_scope(url) as session:
        first = register_bundle(session, v1, promote=False)
        second = register_bundle(session, v2, promote=False)
        assert first.stage == second.stage == ModelStage.staging
        assert production_model(session, "chest") is None
        assert second.manifest["version"] == "20260102T000000Z"
        assert Path(second.bundle_path) == v2.resolve()

    with session_scope(url) as session:
        promote(session, "chest", "20260101T000000Z")
    assert stages(url) == {"20260101T000000Z": ModelStage.production,
                           "20260102T000000Z": ModelStage.staging}

    with session_scope(url) as session:
        promote(session, "chest", "20260102T000000Z")
    with session_scope(url) as session:
        current = production_model(session, "chest")
        assert current is not None and current.version == "20260102T000000Z"
    assert stages(url) == {"20260101T000000Z": ModelStage.retired,
                           "20260102T000000Z": ModelStage.production}

    with session_scope(url) as session:
        events = session.scalars(select(Event).order_by(Event.id)).all()
        assert [e.kind for e in events] == [
            "model_registered", "model_registered", "model_promoted", "model_promoted"]
        assert events[-1].detail["name"] == "chest"
        assert events[-1].detail["version"] == "20260102T000000Z"
        assert events[-1].detail["retired"] == ["20260101T000000Z"]


def test_register_with_promote_replaces_production(url: str, tmp_path: Path) -> None:
    with session_scope(url) as session:
        register_bundle(session, tiny_bundle(tmp_path, "chest", "v1"), promote=True)
        register_bundle(session, tiny_bundle(tmp_path, "other", "v1"), promote=True)
    with session_scope(url) as session:
        register_bundle(session, tiny_bundle(tmp_path, "chest", "v2"), promote=True)
    assert stages(url) == {"v1": ModelStage.retired, "v2": ModelStage.production}
    assert stages(url, "other") == {"v1": ModelStage.production}  # other names untouched
    with session_scope(url) as session:
        assert [(m.name, m.version) for m in list_models(session)] == [
            ("chest", "v1"), ("chest", "v2"), ("other", "v1")]


def test_registering_twice_is_idempotent(url: str, tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path, "chest", "v1")
    with session_scope(url) as session:
        first = register_bundle(session, bundle, promote=False)
    with session_scope(url) as session:
        again = register_bundle(session, bundle, promote=False)
        assert again.id == first.id
        assert len(session.scalars(select(Model)).all()) == 1


def test_altered_bundle_is_not_registered(url: str, tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path, "chest", "v1")
    (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(ManifestError), session_scope(url) as session:
        register_bundle(session, bundle, promote=True)
    assert stages(url) == {}


def test_promote_unknown_version(url: str) -> None:
    with pytest.raises(ModelNotFoundError), session_scope(url) as session:
        promote(session, "chest", "nope")
