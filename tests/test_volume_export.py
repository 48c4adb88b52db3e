"""DICOM SEG and TID 1500 SR of a volume job (scheduler/export/dicom/seg.py, volume_sr.py) through
the export outbox: both pass dciodvfy without errors, Orthanc accepts them over C-STORE, the
SEG's frames reference the source CT instances and carry SNOMED CT codes, the SR references
the SEG."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Export, ExportState
from db.session import session_scope
from lightbox.roots import stored_file
from lightbox.settings import Settings
from lightbox.synthetic_volume import Phantom, make_phantom, write_series
from lightbox.volume import slices_of
from scheduler.export.outbox import build_pass, send_pass
from scheduler.scheduling.route import load_rules
from tests.pacs_peers import dciodvfy_errors, orthanc, require
from tests.volume_helpers import (
    ingest_and_dispatch,
    oracle_bundle,
    register,
    write_enhanced_series,
)
from worker.model_cache import ModelCache
from worker.process import run_job

RULES = """
rules:
  - name: ct-volume
    select: series
    match: {Modality: [CT]}
    range: {Slices: [4, null]}
    models: [ct-lesion]
    export: [pacs]
"""


def _flatten(items):  # type: ignore[no-untyped-def]
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _flatten(item.ContentSequence)


@pytest.mark.slow  # Orthanc is the peer
def test_seg_and_sr_validate_and_orthanc_accepts_them(tmp_path: Path) -> None:
    require("Orthanc", "dciodvfy")
    settings = Settings(data_dir=tmp_path / "data", quiet_seconds=0)
    upgrade(settings.sqlalchemy_url)
    register(settings, oracle_bundle(tmp_path / "bundle"))
    phantom = make_phantom((12, 32, 32), lesions=1, seed=4, noise=3.0, lesion_radius=(3, 4))
    paths = write_series(np.round(phantom.hu), tmp_path / "in" / "ct", spacing=(1, 1, 2.5),
                         shuffle_seed=5)
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    (job,) = ingest_and_dispatch(settings, tmp_path / "in", load_rules(rules_file))
    assert run_job(settings, ModelCache(settings, "onnxruntime"), job) == "succeeded"
    source_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in paths}
    with orthanc(tmp_path / "orthanc") as pacs:
        configured = settings.model_copy(update={
            "rules_file": rules_file, "export_destinations": [
                {"name": "pacs", "type": "dicom", "ae_title": pacs.ae_title,
                 "host": "127.0.0.1", "port": pacs.dicom_port},
                {"name": "elsewhere", "type": "dicom", "ae_title": "NOBODY",
                 "host": "127.0.0.1", "port": 9}]})
        assert build_pass(configured) == 2  # the series rule's export list: pacs only
        with session_scope(settings.sqlalchemy_url) as session:
            built = {e.kind: e for e in session.scalars(select(Export))}
            assert {e.destination for e in session.scalars(select(Export))} == {"pacs"}
        assert set(built) == {"seg", "sr"}
        seg_path, sr_path = (stored_file(settings, str(built[kind].path)) for kind in ("seg", "sr"))
        assert dciodvfy_errors(seg_path) == []
        assert dciodvfy_errors(sr_path) == []
        seg = pydicom.dcmread(seg_path)
        assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
        segment = seg.SegmentSequence[0]
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        referenced = {ref.ReferencedSOPInstanceUID
                      for frame in seg.PerFrameFunctionalGroupsSequence
                      for item in frame.DerivationImageSequence
                      for ref in item.SourceImageSequence}
        assert referenced and referenced <= source_uids
        # Frames only where the lesion is, and its voxel count near the phantom's.
        assert 0.6 * phantom.mask.sum() <= int(seg.pixel_array.sum()) <= 1.6 * phantom.mask.sum()
        sr = pydicom.dcmread(sr_path)
        items = list(_flatten(sr.ContentSequence))
        refs = [ref.ReferencedSOPInstanceUID for item in items
                for ref in item.get("ReferencedSOPSequence", [])]
        assert seg.SOPInstanceUID in refs
        names = {item.ConceptNameCodeSequence[0].CodeValue for item in items
                 if "ConceptNameCodeSequence" in item}
        assert {"118565006", "81827009"} <= names  # Volume, Diameter
        counts = send_pass(configured)
        assert counts.get("sent") == 2, counts
        with session_scope(settings.sqlalchemy_url) as session:
            assert {e.state for e in session.scalars(select(Export))} == {ExportState.sent}
        assert pacs.find_instances(SOPInstanceUID=str(seg.SOPInstanceUID))
        assert pacs.find_instances(SOPInstanceUID=str(sr.SOPInstanceUID))


ENHANCED_RULES = RULES.replace("{Modality: [CT]}", "{Modality: [CT, MR]}")
ORIGIN = (-16.0, -16.0, 40.0)
SPACING = (1.0, 1.0, 2.5)
ENHANCED = [
    pytest.param("eCT_Supplemental.dcm", 1, ExplicitVRLittleEndian, id="enhanced-ct"),
    pytest.param("emri_small.dcm", 2, RLELossless, id="enhanced-mr-two-instances-rle")]


def _enhanced_job(tmp_path: Path, template: str, instances: int, syntax: str,
                  pacs: dict[str, object], lesions: int = 1
                  ) -> tuple[Settings, Phantom, list[Path]]:
    """An Enhanced series of a phantom ingested, routed and run by the real worker path; the
    outbox built for destination ``pacs`` (a SEG and an SR; the SR alone without lesions)."""
    settings = Settings(data_dir=tmp_path / "data", quiet_seconds=0)
    upgrade(settings.sqlalchemy_url)
    register(settings, oracle_bundle(tmp_path / "bundle"))
    phantom = make_phantom((12, 32, 32), lesions=lesions, seed=4, noise=3.0,
                           lesion_radius=(3, 4))
    paths = write_enhanced_series(np.round(phantom.hu), tmp_path / "in" / "mf", template,
                                  spacing=SPACING, origin=ORIGIN, instances=instances,
                                  transfer_syntax=syntax)
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(ENHANCED_RULES)
    (job,) = ingest_and_dispatch(settings, tmp_path / "in", load_rules(rules_file))
    assert run_job(settings, ModelCache(settings, "onnxruntime"), job) == "succeeded"
    settings = settings.model_copy(update={"rules_file": rules_file,
                                           "export_destinations": [pacs]})
    assert build_pass(settings) == (2 if lesions else 1)
    return settings, phantom, paths


def _built(settings: Settings) -> dict[str, Path]:
    with session_scope(settings.sqlalchemy_url) as session:
        return {e.kind: stored_file(settings, str(e.path)) for e in session.scalars(select(Export))}


@pytest.mark.parametrize(("template", "instances", "syntax"), ENHANCED)
def test_enhanced_sources_seg_references_frames_by_geometry(
        tmp_path: Path, template: str, instances: int, syntax: str) -> None:
    require("dciodvfy")
    nowhere = {"name": "pacs", "type": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1",
               "port": 9}
    settings, phantom, paths = _enhanced_job(tmp_path, template, instances, syntax, nowhere)
    built = _built(settings)
    assert set(built) == {"seg", "sr"}
    assert dciodvfy_errors(built["seg"]) == []
    assert dciodvfy_errors(built["sr"]) == []
    # Where each source frame lies (its per-frame Plane Position), by (instance, frame).
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    located = {(ref.sop_instance_uid, ref.frame): ref.position
               for ds, p in zip(sources, paths, strict=True) for ref in slices_of(ds, p)}
    assert len(located) == phantom.hu.shape[0]
    # The files store frames out of position order: only positions can place them.
    stored_z = [located[(str(ds.SOPInstanceUID), n)][2]
                for ds in sources for n in range(1, int(ds.NumberOfFrames) + 1)]
    assert stored_z != sorted(stored_z) and stored_z != sorted(stored_z, reverse=True)

    seg = pydicom.dcmread(built["seg"])
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert str(seg.FrameOfReferenceUID) == str(sources[0].FrameOfReferenceUID)
    assert {str(r.ReferencedSOPInstanceUID)
            for series in seg.ReferencedSeriesSequence
            for r in series.ReferencedInstanceSequence} == {str(ds.SOPInstanceUID)
                                                            for ds in sources}
    pixels = seg.pixel_array.reshape((-1, *phantom.hu.shape[1:]))
    assert len(pixels) == len(seg.PerFrameFunctionalGroupsSequence) > 1
    overlap, frame_z = 0, []
    for group, frame in zip(seg.PerFrameFunctionalGroupsSequence, pixels, strict=True):
        position = tuple(float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient)
        (derivation,) = group.DerivationImageSequence
        (source,) = derivation.SourceImageSequence
        key = (str(source.ReferencedSOPInstanceUID), int(source.ReferencedFrameNumber))
        assert source.ReferencedSOPClassUID == sources[0].SOPClassUID
        assert located[key] == pytest.approx(position, abs=1e-3), key  # the frame it lies on
        # The phantom slice at that position (z = origin + k × spacing, axial, normal +z).
        k = round((position[2] - ORIGIN[2]) / SPACING[2])
        assert frame.any()  # empty frames are omitted
        overlap += int((frame.astype(bool) & phantom.mask[k].astype(bool)).sum())
        frame_z.append(position[2])
    # Frames run along the slice normal, one per position, not in the sources' frame order.
    assert frame_z in (sorted(frame_z), sorted(frame_z, reverse=True))
    assert len(set(frame_z)) == len(frame_z)
    # The lesion, where the phantom has it (a misplaced frame would miss it).
    assert overlap >= 0.6 * phantom.mask.sum()
    assert int(pixels.astype(bool).sum()) <= 1.6 * phantom.mask.sum()
    assert set(frame_z) == {ORIGIN[2] + SPACING[2] * k
                                    for k in np.flatnonzero(phantom.mask.any(axis=(1, 2)))}

    sr = pydicom.dcmread(built["sr"])
    refs = [ref.ReferencedSOPInstanceUID for item in _flatten(sr.ContentSequence)
            for ref in item.get("ReferencedSOPSequence", [])]
    assert seg.SOPInstanceUID in refs
    evidence = {str(ref.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    assert evidence == {str(ds.SOPInstanceUID) for ds in sources} | {str(seg.SOPInstanceUID)}


def test_enhanced_sources_without_lesion_get_an_sr_only(tmp_path: Path) -> None:
    require("dciodvfy")
    nowhere = {"name": "pacs", "type": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1",
               "port": 9}
    settings, _, paths = _enhanced_job(tmp_path, "emri_small.dcm", 2, ExplicitVRLittleEndian,
                                       nowhere, lesions=0)
    built = _built(settings)
    assert set(built) == {"sr"}
    assert dciodvfy_errors(built["sr"]) == []
    sr = pydicom.dcmread(built["sr"])
    evidence = {str(ref.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    assert evidence and evidence <= sources
    assert "2667000" in str(sr.ContentSequence)  # Absent


@pytest.mark.slow
@pytest.mark.parametrize(("template", "instances", "syntax"), ENHANCED)
def test_orthanc_accepts_seg_and_sr_of_enhanced_sources(
        tmp_path: Path, template: str, instances: int, syntax: str) -> None:
    require("Orthanc")
    with orthanc(tmp_path / "orthanc") as pacs:
        destination = {"name": "pacs", "type": "dicom", "ae_title": pacs.ae_title,
                       "host": "127.0.0.1", "port": pacs.dicom_port}
        settings, _, paths = _enhanced_job(tmp_path, template, instances, syntax, destination)
        for path in paths:  # the PACS holds the study the results refer to
            pacs.upload(path)
        counts = send_pass(settings)
        assert counts.get("sent") == 2, counts
        with session_scope(settings.sqlalchemy_url) as session:
            assert {e.state for e in session.scalars(select(Export))} == {ExportState.sent}
        for kind, path in _built(settings).items():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            (found,) = pacs.find_instances(SOPInstanceUID=str(ds.SOPInstanceUID))
            held = pydicom.dcmread(BytesIO(pacs.file(found)))
            assert held.StudyInstanceUID == pydicom.dcmread(paths[0]).StudyInstanceUID, kind
            if kind == "seg":  # Orthanc keeps the frame references as sent
                assert [g.DerivationImageSequence[0].SourceImageSequence[0]
                        .ReferencedFrameNumber for g in held.PerFrameFunctionalGroupsSequence] \
                    == [g.DerivationImageSequence[0].SourceImageSequence[0]
                        .ReferencedFrameNumber for g in ds.PerFrameFunctionalGroupsSequence]
