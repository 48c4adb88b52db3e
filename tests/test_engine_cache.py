"""TensorRT engine cache: choose, reuse and rebuild, with the GPU identity and the builder
injected (no GPU needed); engine names; runtime choice on a node without TensorRT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightbox.errors import ConfigurationError, TensorRTUnavailable
from lightbox.manifest import Manifest, write_bundle_manifest
from lightbox.settings import Settings
from lightbox.trt_engine import (
    GpuIdentity,
    ProfileShapes,
    current_identity,
    engine_filename,
    tensorrt_available,
)
from worker.engine_cache import EngineCache
from worker.runtime import available_runtimes, choose_runtime

H200 = GpuIdentity("NVIDIA H200", "9.0", "10.3.0")
H100 = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0", "10.3.0")
H200_NEW_TRT = GpuIdentity("NVIDIA H200", "9.0", "10.7.0")


class FakeBuilder:
    """Writes an 'engine' naming the identity it was built for, and counts builds."""

    def __init__(self, identity: list[GpuIdentity]) -> None:
        self.identity, self.calls = identity, []  # type: ignore[var-annotated]

    def __call__(self, onnx_path: Path, engine_path: Path, **kwargs: Any) -> Path:
        assert onnx_path.name == "model.onnx" and onnx_path.is_file()
        self.calls.append((engine_path.name, kwargs))
        engine_path.write_bytes(f"engine for {self.identity[0].slug()}".encode())
        return engine_path


def _bundle(directory: Path, version: str = "1", onnx: bytes = b"onnx-1",
            extra: dict[str, bytes] | None = None) -> tuple[Path, Manifest]:
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(onnx)
    for name, data in (extra or {}).items():
        (directory / name).write_bytes(data)
    manifest = write_bundle_manifest(directory, Manifest(
        name="chest", version=version, architecture="t", input={"height": 64, "width": 64},
        preprocessing={}, labels=["p"], thresholds={"p": 0.5}))
    return directory, manifest


def _cache(tmp_path: Path, identity: list[GpuIdentity]) -> tuple[EngineCache, FakeBuilder]:
    builder = FakeBuilder(identity)
    return EngineCache(tmp_path / "engines", identity=lambda: identity[0],
                       builder=builder), builder


def test_identity_slug_and_engine_name() -> None:
    assert H200.slug() == "NVIDIA-H200_sm90_trt10.3.0"
    assert engine_filename("fp16", H200) == "engine_fp16_NVIDIA-H200_sm90_trt10.3.0.plan"
    assert H100.slug() == "NVIDIA-H100-80GB-HBM3_sm90_trt10.3.0"


def test_builds_when_missing_then_reuses(tmp_path: Path) -> None:
    bundle, manifest = _bundle(tmp_path / "bundle")
    identity = [H200]
    cache, builder = _cache(tmp_path, identity)
    first = cache.engine_for(bundle, manifest, precision="fp16", max_batch=32)
    assert cache.last_action == "built" and len(builder.calls) == 1
    assert first.name == engine_filename("fp16", H200)
    assert builder.calls[0][1] == {"precision": "fp16", "profile": ProfileShapes(
        "image", (1, 1, 64, 64), (32, 1, 64, 64), (32, 1, 64, 64))}
    assert not (bundle / first.name).exists()  # never written into the verified bundle
    again = cache.engine_for(bundle, manifest, precision="fp16", max_batch=32)
    assert again == first and cache.last_action == "reused" and len(builder.calls) == 1
    # A new process (new cache object) reuses the file too.
    other, other_builder = _cache(tmp_path, identity)
    assert other.engine_for(bundle, manifest, precision="fp16", max_batch=32) == first
    assert other.last_action == "reused" and not other_builder.calls


@pytest.mark.parametrize("moved_to", [H100, H200_NEW_TRT], ids=["other-gpu", "other-trt"])
def test_rebuilds_for_another_gpu_or_tensorrt_version(tmp_path: Path,
                                                      moved_to: GpuIdentity) -> None:
    bundle, manifest = _bundle(tmp_path / "bundle")
    identity = [H200]
    cache, builder = _cache(tmp_path, identity)
    old = cache.engine_for(bundle, manifest, precision="fp16", max_batch=8)
    identity[0] = moved_to  # the node's GPU was swapped, or TensorRT upgraded
    new = cache.engine_for(bundle, manifest, precision="fp16", max_batch=8)
    assert cache.last_action == "built" and len(builder.calls) == 2
    assert new != old and new.name == engine_filename("fp16", moved_to)
    assert new.read_bytes() == f"engine for {moved_to.slug()}".encode()
    assert old.is_file()  # the other node kind's engine stays usable for it
    identity[0] = H200
    assert cache.engine_for(bundle, manifest, precision="fp16", max_batch=8) == old
    assert cache.last_action == "reused" and len(builder.calls) == 2


def test_rebuilds_when_the_onnx_batch_or_record_changes(tmp_path: Path) -> None:
    bundle, manifest = _bundle(tmp_path / "b1")
    cache, builder = _cache(tmp_path, [H200])
    first = cache.engine_for(bundle, manifest, precision="fp16", max_batch=8)
    # A bigger max batch than the engine's profile needs a new engine.
    cache.engine_for(bundle, manifest, precision="fp16", max_batch=16)
    assert cache.last_action == "built" and len(builder.calls) == 2
    # A damaged sidecar (or engine) is not trusted.
    first.with_suffix(".json").write_text("{not json")
    cache.engine_for(bundle, manifest, precision="fp16", max_batch=16)
    assert cache.last_action == "built" and len(builder.calls) == 3
    first.write_bytes(b"")
    cache.engine_for(bundle, manifest, precision="fp16", max_batch=16)
    assert cache.last_action == "built" and len(builder.calls) == 4
    # A new model version (different ONNX) gets its own engine directory.
    bundle2, manifest2 = _bundle(tmp_path / "b2", version="2", onnx=b"onnx-2")
    second = cache.engine_for(bundle2, manifest2, precision="fp16", max_batch=16)
    assert second.parent != first.parent and cache.last_action == "built"
    # The runtime asks for a forced rebuild when an engine fails to deserialize.
    cache.engine_for(bundle2, manifest2, precision="fp16", max_batch=16, rebuild=True)
    assert cache.last_action == "built" and len(builder.calls) == 6


def test_engine_shipped_in_bundle_for_this_gpu_is_used(tmp_path: Path) -> None:
    shipped = engine_filename("fp16", H200)
    bundle, manifest = _bundle(tmp_path / "bundle", extra={shipped: b"compiled by trainer"})
    cache, builder = _cache(tmp_path, [H200])
    engine = cache.engine_for(bundle, manifest, precision="fp16", max_batch=32)
    assert cache.last_action == "copied" and not builder.calls
    assert engine.read_bytes() == b"compiled by trainer" and engine.parent != bundle
    # The same bundle on another GPU: the shipped engine does not fit, so build.
    other, other_builder = _cache(tmp_path, [H100])
    other.engine_for(bundle, manifest, precision="fp16", max_batch=32)
    assert other.last_action == "built" and len(other_builder.calls) == 1


def test_runtime_choice_on_this_node(tmp_path: Path) -> None:
    ok, reason = tensorrt_available()
    settings = Settings(data_dir=tmp_path, runtime="auto")
    assert choose_runtime(settings) == ("tensorrt" if ok else "onnxruntime")
    assert "onnxruntime" in available_runtimes()
    if not ok:
        assert reason  # says which import or device is missing
        with pytest.raises(ConfigurationError, match="tensorrt"):
            choose_runtime(Settings(data_dir=tmp_path, runtime="tensorrt"))
        with pytest.raises(TensorRTUnavailable):
            current_identity()
    # An unknown runtime never reaches choose_runtime: the settings refuse it at start.
    with pytest.raises(ValueError, match="not one of auto, onnxruntime, tensorrt"):
        Settings(data_dir=tmp_path, runtime="no-such-runtime")
