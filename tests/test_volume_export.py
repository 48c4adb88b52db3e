"""DICOM SEG and TID 1500 SR of a volume job (scheduler/export/dicom/seg.py, volume_sr.py) through
the export outbox: both pass dciodvfy without errors, Orthanc accepts them over C-STORE, the
SEG's frames reference the source CT instances and carry SNOMED CT codes, the SR references
the SEG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Export, ExportState
from db.session import session_scope
from lightbox.roots import stored_file
from lightbox.settings import Settings
from lightbox.synthetic_volume import make_phantom, write_series
from scheduler.export.outbox import build_pass, send_pass
from scheduler.scheduling.route import load_rules
from tests.pacs_peers import dciodvfy_errors, orthanc, require
from tests.volume_helpers import ingest_and_dispatch, oracle_bundle, register
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
