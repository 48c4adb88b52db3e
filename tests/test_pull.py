"""`lightbox pull` against Orthanc: C-FIND by date range *and* modality selects only the
matching study (decoys differ in one filter each), which arrives by C-MOVE at our running SCP (or by C-GET) and is registered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.models import Instance
from db.session import session_scope
from lightbox.synthetic import write_study
from tests.conftest import Backend, run_cli
from tests.pacs_peers import free_port, lightbox_scp, orthanc, with_env


def _study(tmp_path: Path, name: str, date: str, seed: int) -> tuple[list[Path], list[str]]:
    """A two-image CR study dated ``date``."""
    cr = write_study(tmp_path / name, np.random.default_rng(seed), label=1, images=2, size=128)
    for path in cr.paths:
        ds = pydicom.dcmread(path)
        ds.StudyDate = date
        ds.save_as(path)
    return list(cr.paths), list(cr.sop_instance_uids)


def _studies(tmp_path: Path) -> tuple[list[Path], list[str], list[Path]]:
    """The study to pull (CR, January 2024) and two decoys in the PACS that each differ from
    it in ONE filter, so dropping either the date range or the modality pulls a decoy: a CR
    study from 2004 and a CT study from January 2024."""
    cr_paths, cr_uids = _study(tmp_path, "cr", "20240115", 4)
    old_cr_paths, _ = _study(tmp_path, "old-cr", "20040115", 5)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.StudyInstanceUID, ct.SeriesInstanceUID = generate_uid(), generate_uid()
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ct.StudyDate = "20240110"
    ct_path = tmp_path / "ct.dcm"
    ct.save_as(ct_path, enforce_file_format=True)
    return cr_paths, cr_uids, [*old_cr_paths, ct_path]


@pytest.mark.slow  # an Orthanc peer
@pytest.mark.parametrize("method", ["move", "get"])
def test_pull_by_date_and_modality(backend: Backend, tmp_path: Path, method: str) -> None:
    cr_paths, cr_uids, decoys = _studies(tmp_path)
    scp_port = free_port()
    with orthanc(tmp_path / "orthanc",
                 modalities={"lightbox": ["LIGHTBOX", "127.0.0.1", scp_port]}) as pacs, \
            lightbox_scp(backend, tmp_path / "scp.log", port=scp_port, callers="ORTHANC"):
        for path in [*cr_paths, *decoys]:
            pacs.upload(path)
        puller = with_env(backend, LIGHTBOX_PACS_AE_TITLE=pacs.ae_title,
                          LIGHTBOX_PACS_HOST="127.0.0.1", LIGHTBOX_PACS_PORT=str(pacs.dicom_port))
        out = subprocess.run(
            [sys.executable, "-m", "cli.main", "pull", "--since", "2024-01-01",
             "--until", "2024-01-31", "--modality", "CR", "--method", method],
            env=puller.env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["studies"] == 1 and report["completed"] == 2 and report["failed"] == 0
    with session_scope(backend.settings.sqlalchemy_url) as session:
        rows = {i.sop_instance_uid: i.source for i in session.scalars(select(Instance))}
    source = "scp:ORTHANC" if method == "move" else "pull:ORTHANC"
    assert rows == {uid: source for uid in cr_uids}  # neither the 2004 CR nor the 2024 CT


def test_pull_unreachable_pacs_is_a_clear_error(sqlite_backend: Backend) -> None:
    env = with_env(sqlite_backend, LIGHTBOX_PACS_PORT=str(free_port())).env
    out = run_cli(env, "pull", "--modality", "CR")
    assert out.returncode != 0
    assert "is not reachable" in out.stderr and "Traceback" not in out.stderr
