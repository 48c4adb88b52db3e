"""The worker's volume path (worker/volume_job.py) end to end on real files: ingest a shuffled
CT series, route it by a series rule, run it through the real batcher and decode pool with a
real ONNX model, and check the series findings against the phantom's truth; bad input fails
the job with its reason, other jobs go on."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Instance, Job, JobState
from db.session import session_scope
from db.volume_tables import SeriesFinding
from lightbox.roots import stored_file
from lightbox.settings import Settings
from lightbox.synthetic_volume import make_phantom, write_series
from scheduler.scheduling.route import load_rules
from tests.conftest import Backend, run_cli
from tests.volume_helpers import ingest_and_dispatch, oracle_bundle, phantom_truth, register
from worker.decode_pool import DecodePool
from worker.model_cache import ModelCache
from worker.pipeline import WorkerPipeline
from worker.process import run_job

RULES = """
rules:
  - name: ct-volume
    select: series
    match: {Modality: [CT]}
    range: {Slices: [4, null]}
    models: [ct-lesion]
"""
SPACING = (1.0, 1.0, 2.5)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:  # a fresh data dir per test (not conftest's)
    settings = Settings(data_dir=tmp_path / "data", quiet_seconds=0)
    upgrade(settings.sqlalchemy_url)
    return settings


def _rules(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return load_rules(path)


def test_series_findings_match_the_phantom(tmp_path: Path, backend: Backend) -> None:
    """SQLite and PostgreSQL; `lightbox results` shows the series findings."""
    settings = backend.settings.model_copy(update={"quiet_seconds": 0})
    register(settings, oracle_bundle(tmp_path / "bundle", spacing=(1.5, 1.5, 2.5)))
    phantoms = [make_phantom((20, 48, 48), lesions=n, seed=11 + n, noise=3.0,
                             lesion_radius=(3.0, 5.0)) for n in (2, 0)]
    for index, phantom in enumerate(phantoms):
        write_series(np.round(phantom.hu), tmp_path / "in" / str(index), spacing=SPACING,
                     shuffle_seed=index + 1, origin=(-24.0, -24.0, 10.0))
    jobs = ingest_and_dispatch(settings, tmp_path / "in", _rules(tmp_path))
    assert len(jobs) == 2
    pipeline = WorkerPipeline(settings, ModelCache(settings, "onnxruntime"), DecodePool(2))
    try:
        with ThreadPoolExecutor(2) as pool:  # both series' patches share the batcher
            outcomes = list(pool.map(lambda j: run_job(settings, pipeline, j), jobs))
    finally:
        pipeline.close()
    assert outcomes == ["succeeded", "succeeded"]
    with session_scope(settings.sqlalchemy_url) as session:
        found = {f.job_id: f for f in session.scalars(select(SeriesFinding))}
        assert set(found) == set(jobs)
        with_lesions, without = found[jobs[0]], found[jobs[1]]
        truth = phantoms[0]
        assert with_lesions.positive and with_lesions.lesion_count == len(truth.lesions) == 2
        assert with_lesions.volume_ml == pytest.approx(phantom_truth(truth.mask, SPACING),
                                                       rel=0.3)
        largest_radius = max(max(r[1:]) for _, r in truth.lesions)  # in-plane, 1 mm voxels
        assert 1.6 * largest_radius <= with_lesions.largest_diameter_mm <= 2.6 * max(
            max(r[1] * SPACING[1], r[2] * SPACING[0], r[0] * SPACING[2]) for _, r in truth.lesions)
        # Centroid in patient coordinates (LPS): origin + voxel index × spacing of the truth.
        z, y, x = (float(v.mean()) for v in np.nonzero(truth.mask))
        assert (with_lesions.centroid_x, with_lesions.centroid_y, with_lesions.centroid_z) == \
            pytest.approx((-24.0 + x, -24.0 + y, 10.0 + 2.5 * z), abs=1.5)
        assert not without.positive and without.lesion_count == 0 and without.volume_ml == 0
        mask = np.load(stored_file(settings, with_lesions.mask_path))
        assert mask["mask"].shape == (20, 48, 48)
        # The mask is on the source grid, in plan order (ascending z), close to the truth.
        overlap = (mask["mask"] > 0) & (truth.mask > 0)
        assert overlap.sum() >= 0.6 * truth.mask.sum()
    shown = run_cli(backend.env, "results", "--series", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    rows = {r["job_id"]: r for r in json.loads(shown.stdout)}
    assert rows[jobs[0]]["lesion_count"] == 2 and rows[jobs[1]]["lesion_count"] == 0
    listed = run_cli({**backend.env, "COLUMNS": "200"}, "results")
    assert listed.returncode == 0, listed.stderr
    table = listed.stdout
    assert "Series findings" in table and "POSITI" in table, table


def test_bad_series_fail_with_reason_and_others_go_on(tmp_path: Path,
                                                      settings: Settings) -> None:
    register(settings, oracle_bundle(tmp_path / "bundle"))
    hu = np.round(make_phantom((10, 24, 24), lesions=1, seed=2).hu)
    gap = write_series(hu, tmp_path / "in" / "gap", spacing=SPACING, origin=(0, 0, 0))
    gone = [p for p in gap if float(pydicom.dcmread(p).ImagePositionPatient[2]) == 12.5]
    gone[0].unlink()
    corrupt = write_series(hu, tmp_path / "in" / "corrupt", spacing=SPACING)
    bad_uid = str(pydicom.dcmread(corrupt[3]).SOPInstanceUID)
    write_series(hu, tmp_path / "in" / "good", spacing=SPACING)
    jobs = ingest_and_dispatch(settings, tmp_path / "in", _rules(tmp_path))
    # A stored slice damaged after registration (a disk fault): decoding it fails.
    with session_scope(settings.sqlalchemy_url) as session:
        stored = stored_file(settings, session.scalar(select(Instance.stored_path).where(
            Instance.sop_instance_uid == bad_uid)))
    stored.write_bytes(stored.read_bytes()[:-500])
    cache = ModelCache(settings, "onnxruntime")
    outcomes = {job: run_job(settings, cache, job) for job in jobs}
    with session_scope(settings.sqlalchemy_url) as session:
        rows = {j.id: j for j in session.scalars(select(Job))}
        reasons = sorted(str(j.error_detail) for j in rows.values() if j.state == JobState.dead)
        assert sorted(outcomes.values()) == ["dead", "dead", "succeeded"]
        assert any("gap of 5.0 mm at z = 15.0" in r for r in reasons)
        assert any(bad_uid in r for r in reasons)
        assert session.scalar(select(SeriesFinding.lesion_count)) == 1
