"""Helpers for the volume tests: an "oracle" segmentation bundle (a real ONNX graph run by the
real runtime: a band-pass on windowed intensity that marks exactly the phantom's lesions, so
measurements can be checked against the phantom's truth), and a study ingested and routed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from db.model_registry import register_bundle
from db.models import Job
from db.session import session_scope
from lightbox.manifest import InputSpec, Manifest, PreprocessSpec, VolumeSpec, write_bundle_manifest
from lightbox.settings import Settings
from scheduler.ingest.folder import ingest_paths
from scheduler.scheduling.dispatch import PassReport, dispatch_ready
from scheduler.scheduling.route import Rule

ROI = (8, 24, 24)
# Window 40 / 1000 HU: tissue (40) → 0.50, lesion (110) → 0.57, bone → 1, lung → 0.04.
LOW, HIGH = 0.535, 0.65


def oracle_bundle(directory: Path, spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
                  name: str = "ct-lesion", mode: str = "sliding_window") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, *ROI])
    out_shape = ["batch", 1, *ROI] if mode == "sliding_window" else ["batch", 1]
    y = helper.make_tensor_value_info(
        "probabilities" if mode == "sliding_window" else "scores", TensorProto.FLOAT, out_shape)
    const = [helper.make_node("Constant", [], [n], value=helper.make_tensor(n, TensorProto.FLOAT,
                                                                            [], [v]))
             for n, v in (("low", LOW), ("high", HIGH), ("k", 300.0))]
    nodes = [*const,
             helper.make_node("Sub", ["image", "low"], ["a"]),
             helper.make_node("Mul", ["a", "k"], ["ak"]),
             helper.make_node("Sigmoid", ["ak"], ["sa"]),
             helper.make_node("Sub", ["high", "image"], ["b"]),
             helper.make_node("Mul", ["b", "k"], ["bk"]),
             helper.make_node("Sigmoid", ["bk"], ["sb"])]
    if mode == "sliding_window":
        nodes.append(helper.make_node("Mul", ["sa", "sb"], ["probabilities"]))
    else:
        nodes += [helper.make_node("Mul", ["sa", "sb"], ["p"]),
                  helper.make_node("ReduceMax", ["p"], ["scores"], axes=[2, 3, 4], keepdims=0)]
    graph = helper.make_graph(nodes, "oracle", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / "model.onnx"))
    manifest = Manifest(
        name=name, version="oracle-1", architecture="onnx_oracle_bandpass",
        input=InputSpec(channels=1, depth=ROI[0], height=ROI[1], width=ROI[2]),
        output_name="probabilities" if mode == "sliding_window" else "scores",
        preprocessing=PreprocessSpec(), labels=["lesion"], thresholds={"lesion": 0.5},
        level="study", training_data={"synthetic": True},
        volume=VolumeSpec(spacing=spacing, window_center=40, window_width=1000,
                          mode=mode, roi_size=ROI, overlap=0.25,  # type: ignore[arg-type]
                          output="segmentation" if mode == "sliding_window"
                          else "classification", min_slices=4, segment_threshold=0.5))
    write_bundle_manifest(directory, manifest)
    return directory


def register(settings: Settings, bundle: Path) -> int:
    with session_scope(settings.sqlalchemy_url) as session:
        return register_bundle(session, bundle, promote=True).id


def ingest_and_dispatch(settings: Settings, folder: Path, rules: list[Rule]) -> list[int]:
    ingest_paths(settings, [folder])
    dispatch_ready(settings, rules, PassReport())
    with session_scope(settings.sqlalchemy_url) as session:
        return [j.id for j in session.query(Job).order_by(Job.id)]


def phantom_truth(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """The phantom's lesion volume in mL."""
    return float(mask.sum()) * float(np.prod(spacing)) / 1000.0
