"""Helpers for the volume tests: an "oracle" segmentation bundle (a real ONNX graph run by the
real runtime: a band-pass on windowed intensity that marks exactly the phantom's lesions, so
measurements can be checked against the phantom's truth), and a study ingested and routed."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import onnx
import pydicom
from onnx import TensorProto, helper
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from db.model_registry import register_bundle
from db.models import Job
from db.session import session_scope
from lightbox.manifest import InputSpec, Manifest, PreprocessSpec, VolumeSpec, write_bundle_manifest
from lightbox.settings import Settings
from lightbox.synthetic_volume import SYNTHETIC_NOTE
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


def write_enhanced_series(hu: np.ndarray, out_dir: Path, template: str = "eCT_Supplemental.dcm",
                          spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
                          origin: tuple[float, float, float] = (-100.0, -100.0, 50.0),
                          orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
                          instances: int = 1, frame_seed: int | None = 3,
                          transfer_syntax: str = ExplicitVRLittleEndian,
                          study_uid: str | None = None) -> list[Path]:
    """``hu`` (z, y, x) as an Enhanced multi-frame series built from a real pydicom-data
    Enhanced CT/MR header (``eCT_Supplemental.dcm``, ``emri_small.dcm``): new UIDs, geometry in
    the shared and per-frame functional groups, pixels stored with intercept -1024 (in the Pixel
    Value Transformation group), SYNTHETIC. Slices are dealt round-robin over ``instances``
    files and, within a file, put in a frame order shuffled by ``frame_seed``: neither frame
    number nor file says where a frame lies, only its Plane Position does."""
    template_path = get_testdata_file(template)
    if not isinstance(template_path, str):
        raise FileNotFoundError(f"pydicom-data has no test file {template!r}")
    base = pydicom.dcmread(template_path)
    for keyword in ("PixelData", "PerFrameFunctionalGroupsSequence",
                    "SharedFunctionalGroupsSequence", "DimensionIndexSequence",
                    "DimensionOrganizationSequence", "RedPaletteColorLookupTableDescriptor",
                    "GreenPaletteColorLookupTableDescriptor",
                    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
                    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
                    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword in base:
            del base[keyword]
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), generate_uid(), generate_uid()
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, column)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(instances):
        ks = list(range(number, hu.shape[0], instances))
        if frame_seed is not None:
            random.Random(frame_seed + number).shuffle(ks)
        ds = base.copy()
        ds.file_meta = copy.copy(base.file_meta)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = ds.PatientID = "SYNTHETIC"
        ds.PatientBirthDate = ds.AccessionNumber = ""
        ds.SeriesDescription = "SYNTHETIC phantom (Enhanced)"
        ds.ImageComments = SYNTHETIC_NOTE
        ds.InstanceNumber = number + 1
        ds.ContentQualification = "RESEARCH"
        ds.NumberOfFrames = len(ks)
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PresentationLUTShape = "IDENTITY"
        shared = Dataset()
        shared.PlaneOrientationSequence = [Dataset()]
        shared.PlaneOrientationSequence[0].ImageOrientationPatient = [
            f"{v:.6f}" for v in orientation]
        shared.PixelMeasuresSequence = [Dataset()]
        shared.PixelMeasuresSequence[0].PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]
        shared.PixelMeasuresSequence[0].SliceThickness = f"{spacing[2]:g}"
        shared.PixelValueTransformationSequence = [Dataset()]
        transform = shared.PixelValueTransformationSequence[0]
        transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = \
            "-1024", "1", "HU" if ds.Modality == "CT" else "US"
        ds.SharedFunctionalGroupsSequence = [shared]
        ds.PerFrameFunctionalGroupsSequence = []
        for k in ks:
            group = Dataset()
            group.PlanePositionSequence = [Dataset()]
            group.PlanePositionSequence[0].ImagePositionPatient = [
                f"{v:.4f}" for v in np.asarray(origin, float) + normal * spacing[2] * k]
            group.FrameContentSequence = [Dataset()]
            group.FrameContentSequence[0].StackID = "1"
            group.FrameContentSequence[0].InStackPositionNumber = k + 1
            ds.PerFrameFunctionalGroupsSequence.append(group)
        pixels = np.clip(np.round(hu[ks] + 1024.0), 0, 65535).astype("<u2")
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.add_new(0x7FE00010, "OW", pixels.tobytes())
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, pixels, encoding_plugin="pydicom")
        path = out_dir / f"{number + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
