"""Orthanc as the hospital PACS, end to end with real processes:

Orthanc C-STOREs a study (the real chest CRs, uncompressed and JPEG 2000) to `lightbox scp`; a
real scheduler and worker produce findings; `lightbox export` sends the SR and the heatmap SCs
back to Orthanc by C-STORE and by STOW-RS (Orthanc's DICOMweb plugin); the test reads them back
from Orthanc's REST API, checks their content and runs dciodvfy on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import select

from db.models import Export, ExportState, Finding, Instance, Job, JobState, Study
from db.session import session_scope
from lightbox.heatmaps import save_heatmap
from lightbox.synthetic import real_chest_crs
from tests.conftest import Backend, stop_processes, wait_for
from tests.pacs_peers import (
    dciodvfy_errors,
    free_port,
    lightbox_scp,
    orthanc,
    require,
    require_dicomweb,
    with_env,
)


def test_orthanc_round_trip(backend: Backend, registered_model: tuple[int, str],
                            tmp_path: Path) -> None:
    require("Orthanc", "dciodvfy")
    require_dicomweb()  # STOW-RS to Orthanc is half of the export: no silent drop without it
    model_id, model_version = registered_model
    logs = tmp_path / "logs"
    logs.mkdir()
    scp_port = free_port()
    study_uid, paths = real_chest_crs(tmp_path / "real")
    source_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    url = backend.settings.sqlalchemy_url
    with orthanc(tmp_path / "orthanc",
                 modalities={"lightbox": ["LIGHTBOX", "127.0.0.1", scp_port]}) as pacs, \
            lightbox_scp(backend, logs / "scp.log", port=scp_port, callers="ORTHANC"):
        study_id = {pacs.upload(path)["ParentStudy"] for path in paths}.pop()
        procs = [backend.spawn("worker", log=logs / "worker.log"),
                 backend.spawn("scheduler", log=logs / "scheduler.log")]
        try:
            pacs.post("/modalities/lightbox/store", {"Resources": [study_id], "Synchronous": True})

            def job() -> Job | None:
                with session_scope(url) as session:
                    found = session.scalars(select(Job).join(Study).where(
                        Study.study_instance_uid == study_uid)).first()
                    return found if found is not None and found.state.terminal else None

            done = wait_for(job, 240, what="job for the study Orthanc sent")
            assert done.state == JobState.succeeded
            with session_scope(url) as session:
                sources = {i.sop_instance_uid: i.source for i in session.scalars(select(Instance))}
                findings = list(session.scalars(select(Finding).where(
                    Finding.job_id == done.id)))
            assert sources == {uid: "scp:ORTHANC" for uid in source_uids}
            assert {f.sop_instance_uid for f in findings} == source_uids
            # The seed CNN has no CAM output: give the job maps as a CAM model's worker would.
            y, x = np.mgrid[0:32, 0:32]
            for uid in source_uids:
                save_heatmap(backend.settings, done.id, uid,
                             np.exp(-((x - 20) ** 2 + (y - 12) ** 2) / 40.0)[None])
            destinations = [
                {"name": "pacs", "type": "dicom", "ae_title": pacs.ae_title,
                 "host": "127.0.0.1", "port": pacs.dicom_port},
                {"name": "pacs-web", "type": "stow", "url": f"{pacs.url}/dicom-web"}]
            exporter = with_env(backend, LIGHTBOX_EXPORT_DESTINATIONS=json.dumps(destinations),
                                LIGHTBOX_EXPORT_INTERVAL="0.3", LIGHTBOX_EXPORT_BACKOFF_SECONDS="1"
                                ).spawn("export", log=logs / "export.log")
            procs.append(exporter)

            def exported() -> list[Export]:
                with session_scope(url) as session:
                    rows = list(session.scalars(select(Export).where(Export.job_id == done.id)))
                ok = rows and all(r.state == ExportState.sent for r in rows)
                assert not any(r.state == ExportState.dead for r in rows), [
                    (r.error_code, r.error_detail) for r in rows]
                return rows if ok else []

            rows = wait_for(exported, 120, what="SR and SCs exported to Orthanc")
        finally:
            stop_processes(procs)
        assert {(r.destination, r.kind) for r in rows} == {
            (d["name"], kind) for d in destinations for kind in ("sr", "sc")}
        assert len(rows) == 3 * len(destinations)  # one SR, one SC per source image
        objects = {}
        for row in rows:
            found = pacs.find_instances(SOPInstanceUID=str(row.sop_instance_uid))
            assert len(found) == 1, f"{row.kind} {row.sop_instance_uid} not in Orthanc"
            target = tmp_path / f"{row.kind}-{row.sop_instance_uid}.dcm"
            target.write_bytes(pacs.file(found[0]))
            objects[row.sop_instance_uid] = (row, target)

    for row, path in objects.values():
        assert dciodvfy_errors(path) == [], f"{row.kind}: {dciodvfy_errors(path)}"
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == study_uid  # filed under the source study
        if row.kind == "sr":
            assert ds.Modality == "SR" and ds.VerificationFlag == "UNVERIFIED"
            text = str(ds.ContentSequence)
            assert "chest" in text and model_version in text
            assert "Pneumonia" in text and "233604007" in text  # the label as SNOMED CT
            referenced = {ref.ReferencedSOPInstanceUID
                          for study in ds.CurrentRequestedProcedureEvidenceSequence
                          for series in study.ReferencedSeriesSequence
                          for ref in series.ReferencedSOPSequence}
            assert referenced == source_uids
        else:
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
            assert ds.PhotometricInterpretation == "RGB" and "DERIVED" in ds.ImageType
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == row.source_sop_instance_uid
            rgb = ds.pixel_array.astype(int)
            assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 30).any()  # colour: the map is drawn
