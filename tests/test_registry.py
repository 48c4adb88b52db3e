"""The model registry on a real (SQLite) database with real, hash-verified bundles."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from sqlalchemy import select

from db.migrate import upgrade
from db.model_registry import list_models, production_model, promote, register_bundle, retire
from db.models import Event, Model, ModelStage
from db.session import session_scope
from lightbox.errors import ManifestError, ModelNotFoundError
from lightbox.manifest import (
    InputSpec,
    Manifest,
    PreprocessSpec,
    sha256_file,
    update_bundle_manifest,
    write_bundle_manifest,
)


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
            "model_registered", "model_registered", "model_promoted", "model_retired",
            "model_promoted"]
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


def test_retire(url: str, tmp_path: Path) -> None:
    with session_scope(url) as session:
        register_bundle(session, tiny_bundle(tmp_path, "chest", "v1"), promote=True)
    with session_scope(url) as session:
        retire(session, "chest", "v1")
    with session_scope(url) as session:
        assert production_model(session, "chest") is None  # new studies: unrouted, with reason
        kinds = [e.kind for e in session.scalars(select(Event).order_by(Event.id))]
        assert kinds[-1] == "model_retired"
    assert stages(url) == {"v1": ModelStage.retired}
    with pytest.raises(ModelNotFoundError), session_scope(url) as session:
        retire(session, "chest", "v9")


def test_added_files_update_a_registered_bundle_but_changed_files_do_not(
    url: str, tmp_path: Path
) -> None:
    bundle = tiny_bundle(tmp_path, "chest", "v1")
    with session_scope(url) as session:
        register_bundle(session, bundle)
    (bundle / "model.int8.onnx").write_bytes((bundle / "model.onnx").read_bytes())
    update_bundle_manifest(bundle, variants={"onnx_int8": {"file": "model.int8.onnx"}})
    with session_scope(url) as session:
        row = register_bundle(session, bundle)
        assert set(row.manifest["files"]) == {"model.onnx", "model.int8.onnx"}
        assert row.manifest["variants"]["onnx_int8"]["file"] == "model.int8.onnx"
        assert session.scalars(select(Event).order_by(Event.id.desc())).first().kind == (
            "model_updated")
    # A rebuilt compiled form (compile run again) replaces the old one.
    (bundle / "model.int8.onnx").write_bytes(b"rebuilt")
    write_bundle_manifest(bundle, Manifest.model_validate_json(
        (bundle / "manifest.json").read_text()))
    with session_scope(url) as session:
        assert register_bundle(session, bundle).manifest["files"]["model.int8.onnx"] == (
            sha256_file(bundle / "model.int8.onnx"))
    # Rewriting the manifest over a changed model is not an update: refused.
    (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes() + b"\0")
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    write_bundle_manifest(bundle, manifest)
    with pytest.raises(ManifestError, match="different files"), session_scope(url) as session:
        register_bundle(session, bundle)


def test_update_refuses_an_altered_bundle(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path, "chest", "v1")
    (bundle / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ManifestError, match="sha256"):
        update_bundle_manifest(bundle, variants={})


def test_models_retire_cli(tmp_path: Path) -> None:
    import os
    import subprocess

    from tests.conftest import run_cli

    data = tmp_path / "data"
    bundle = tiny_bundle(tmp_path / "bundles", "chest", "v1")
    env = {**os.environ, "LIGHTBOX_DATA_DIR": str(data)}
    env.pop("LIGHTBOX_DATABASE_URL", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(env, "models", *args)  # in process: the command is the point

    assert cli("register", str(bundle), "--promote").returncode == 0
    assert cli("retire", "chest", "v1").returncode == 0
    listed = cli("list", "--format", "json")
    assert '"stage": "retired"' in listed.stdout
    missing = cli("retire", "chest", "v2")
    assert missing.returncode == 1 and "no registered model chest v2" in missing.stderr
