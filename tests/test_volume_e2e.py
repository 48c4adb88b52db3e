"""The volume path end to end with real processes, on SQLite and on PostgreSQL: three CT studies
sent by dcmtk ``storescu`` to a real `lightbox scp`, every slice in shuffled order; after the
quiet time a real `lightbox scheduler` routes each series to the volume model (a series rule),
a real Celery `lightbox worker` runs the jobs, and a real `lightbox export` sends the SEG and the
TID 1500 SR of the good series to Orthanc.

Bad input fails only its own job, with the reason: a series with one corrupt slice (RLE pixel
data cut short, stored as received) names that instance; a series whose slices disagree (one
slice of another size) says so; the good study's job succeeds beside them."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import RLELossless
from sqlalchemy import select

from db.models import Export, ExportState, Job, JobState, Series, Study
from db.session import session_scope
from db.volume_tables import JobSeries, SeriesFinding
from lightbox.synthetic_volume import make_phantom, write_series
from tests.conftest import Backend, stop_processes, wait_for
from tests.pacs_peers import (
    dciodvfy_errors,
    free_port,
    lightbox_scp,
    orthanc,
    require,
    run_dcmtk,
    with_env,
)
from tests.volume_helpers import oracle_bundle, phantom_truth, register

pytestmark = pytest.mark.slow

RULES = """
rules:
  - name: ct-volume
    select: series
    match: {Modality: [CT]}
    range: {Slices: [4, null]}
    models: [ct-lesion]
    export: [pacs]
"""
SPACING = (1.0, 1.0, 2.5)


def _corrupt_rle_series(hu: np.ndarray, folder: Path, bad: int) -> tuple[list[Path], str]:
    """The series RLE Lossless (as a modality may send it), slice ``bad``'s one RLE fragment
    cut in half and encapsulated again: a well-formed file whose pixels cannot be decoded."""
    paths = write_series(hu, folder, spacing=SPACING, shuffle_seed=3)
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless, encoding_plugin="pydicom")
        if index == bad:
            fragment = next(generate_frames(ds.PixelData, number_of_frames=1))
            ds.PixelData = encapsulate([fragment[: len(fragment) // 2]])
        ds.save_as(path, enforce_file_format=True)
    return paths, str(pydicom.dcmread(paths[bad], stop_before_pixels=True).SOPInstanceUID)


def _mixed_size_series(hu: np.ndarray, folder: Path, odd: int) -> tuple[list[Path], str]:
    """One slice of the series stored at half the matrix (32 × 32 in a 64 × 64 series)."""
    paths = write_series(hu, folder, spacing=SPACING, shuffle_seed=4)
    ds = pydicom.dcmread(paths[odd])
    half = ds.pixel_array[::2, ::2].copy()
    ds.Rows, ds.Columns = half.shape
    ds.PixelData = half.astype("<u2").tobytes()
    ds.save_as(paths[odd], enforce_file_format=True)
    return paths, str(ds.SOPInstanceUID)


def _study(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def test_storescu_to_seg_and_sr_in_orthanc(backend: Backend, tmp_path: Path) -> None:
    require("storescu", "Orthanc", "dciodvfy")
    logs = tmp_path / "logs"
    logs.mkdir()
    register(backend.settings, oracle_bundle(tmp_path / "bundle", spacing=(1.5, 1.5, 2.5)))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    phantom = make_phantom((16, 64, 64), lesions=2, seed=13, noise=3.0, lesion_radius=(3.0, 5.0))
    hu = np.round(phantom.hu)
    good = write_series(hu, tmp_path / "good", spacing=SPACING, shuffle_seed=1,
                        origin=(-32.0, -32.0, 10.0))
    corrupt, corrupt_uid = _corrupt_rle_series(hu[:10], tmp_path / "corrupt", bad=4)
    mixed, odd_uid = _mixed_size_series(hu[:10], tmp_path / "mixed", odd=6)
    studies = {"good": _study(good), "corrupt": _study(corrupt), "mixed": _study(mixed)}
    source_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in good}
    files = [*good, *corrupt, *mixed]
    random.Random(7).shuffle(files)  # slices of the three studies interleaved, out of order
    url = backend.settings.sqlalchemy_url

    with orthanc(tmp_path / "orthanc") as pacs:
        destinations = [{"name": "pacs", "type": "dicom", "ae_title": pacs.ae_title,
                         "host": "127.0.0.1", "port": pacs.dicom_port}]
        peer = with_env(backend, LIGHTBOX_RULES_FILE=str(rules),
                        LIGHTBOX_EXPORT_DESTINATIONS=json.dumps(destinations),
                        LIGHTBOX_EXPORT_INTERVAL="0.3", LIGHTBOX_EXPORT_BACKOFF_SECONDS="1")
        with lightbox_scp(peer, logs / "scp.log", callers="MODALITY", port=free_port()) as port:
            procs = [peer.spawn("worker", log=logs / "worker.log"),
                     peer.spawn("scheduler", log=logs / "scheduler.log"),
                     peer.spawn("export", log=logs / "export.log")]
            try:
                # -xr: RLE and uncompressed contexts side by side; each file goes as stored.
                sent = run_dcmtk("storescu", "-xr", "-aet", "MODALITY", "-aec", "LIGHTBOX",
                                 "127.0.0.1", str(port), *map(str, files))
                assert sent.returncode == 0, sent.stderr

                def settled() -> bool:
                    with session_scope(url) as session:
                        jobs = list(session.scalars(select(Job)))
                        if len(jobs) < 3 or not all(j.state.terminal for j in jobs):
                            return False
                        good_jobs = [j.id for j in jobs if j.state == JobState.succeeded]
                        exports = list(session.scalars(
                            select(Export).where(Export.job_id.in_(good_jobs))))
                        assert not any(e.state == ExportState.dead for e in exports), [
                            (e.kind, e.error_code, e.error_detail) for e in exports]
                        return len(exports) == 2 and all(
                            e.state == ExportState.sent for e in exports)

                wait_for(settled, 300, what=f"volume jobs run and exported ({backend.name})")
            finally:
                stop_processes(procs)

        with session_scope(url) as session:
            rows = session.execute(
                select(Study.study_instance_uid, Study.last_received_at, Job, JobSeries)
                .join(Job, Job.study_id == Study.id)
                .join(JobSeries, JobSeries.job_id == Job.id)).all()
            jobs = {uid: (received, job, chosen) for uid, received, job, chosen in rows}
            assert set(jobs) == set(studies.values())  # one job per study, each routed
            series_of = dict(session.execute(select(Series.series_instance_uid, Study.study_instance_uid)
                                             .join(Study, Series.study_id == Study.id)).all())
            for uid, (received, job, chosen) in jobs.items():
                assert series_of[chosen.series_instance_uid] == uid and chosen.rule == "ct-volume"
                # Routed only after the study was quiet.
                assert job.created_at >= received + timedelta(
                    seconds=backend.settings.quiet_seconds)
            _, good_job, _ = jobs[studies["good"]]
            _, corrupt_job, _ = jobs[studies["corrupt"]]
            _, mixed_job, _ = jobs[studies["mixed"]]
            assert good_job.state == JobState.succeeded
            assert corrupt_job.state == JobState.dead and corrupt_job.attempts == 1
            assert corrupt_job.error_code == "pixel_decode"
            assert corrupt_uid in str(corrupt_job.error_detail)
            assert mixed_job.state == JobState.dead
            assert "size differs" in str(mixed_job.error_detail)
            assert odd_uid in str(mixed_job.error_detail) and "32×32" in str(mixed_job.error_detail)
            (finding,) = session.scalars(select(SeriesFinding))
            assert finding.job_id == good_job.id and finding.positive
            assert finding.lesion_count == len(phantom.lesions) == 2
            assert finding.volume_ml == pytest.approx(phantom_truth(phantom.mask, SPACING),
                                                      rel=0.3)
            exports = {e.kind: e for e in session.scalars(select(Export))}
        assert set(exports) == {"seg", "sr"}

        held = {}
        for kind, row in exports.items():
            (found,) = pacs.find_instances(SOPInstanceUID=str(row.sop_instance_uid))
            path = tmp_path / f"{kind}.dcm"
            path.write_bytes(pacs.file(found))
            held[kind] = pydicom.dcmread(BytesIO(path.read_bytes()))
            assert held[kind].StudyInstanceUID == studies["good"]
            assert dciodvfy_errors(path) == [], kind
    seg, sr = held["seg"], held["sr"]
    referenced = {ref.ReferencedSOPInstanceUID for frame in seg.PerFrameFunctionalGroupsSequence
                  for item in frame.DerivationImageSequence for ref in item.SourceImageSequence}
    assert referenced and referenced <= source_uids
    assert 0.6 * phantom.mask.sum() <= int(seg.pixel_array.sum()) <= 1.6 * phantom.mask.sum()
    assert seg.SOPInstanceUID in str(sr.ContentSequence)
    for name in ("worker", "scheduler", "export", "scp"):
        log = (logs / f"{name}.log").read_text()
        assert "Traceback" not in log, f"{name} log has a traceback:\n{log[-3000:]}"
