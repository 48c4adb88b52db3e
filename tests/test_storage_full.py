"""Fault scenario "storage full": the SCP answers 0xA700 (out of resources) and nothing is
half-registered — every instance is either stored *and* registered, or neither.

Two ways to fill storage for real: a free-space floor above what the disk has, and (as root)
a 1 MiB tmpfs mounted as the storage folder, filled by real C-STOREs until ENOSPC."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts
from sqlalchemy import select

from db.models import Instance
from db.session import session_scope
from lightbox.roots import stored_file
from lightbox.synthetic import write_study
from tests.conftest import Backend, wait_for
from tests.pacs_peers import lightbox_scp, require, run_dcmtk
from tests.peers import require_that

OUT_OF_RESOURCES = 0xA700


def _send_all(port: int, datasets: list[pydicom.Dataset]) -> dict[str, int]:
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = StoragePresentationContexts[:100]
    assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX")
    assert assoc.is_established
    statuses = {}
    try:
        for ds in datasets:
            statuses[str(ds.SOPInstanceUID)] = int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()
    return statuses


def _rows(backend: Backend) -> dict[str, str | None]:
    with session_scope(backend.settings.sqlalchemy_url) as session:
        return {i.sop_instance_uid: i.stored_path for i in session.scalars(select(Instance))}


def _leftovers(backend: Backend) -> list[Path]:
    """Half-written files anywhere, and spool slots that still hold bytes (a slot is kept
    only while its instance waits for registration; a refused one is emptied at once)."""
    data = backend.settings.data_path
    return [p for p in data.rglob("*") if p.is_file() and
            (p.name.startswith(".incoming-") or p.parent.name == "incoming"
             or (p.parent.name == ".spool" and p.stat().st_size > 0))]


def test_free_space_floor_answers_out_of_resources(backend: Backend, tmp_path: Path) -> None:
    require("storescu")
    study = write_study(tmp_path / "study", np.random.default_rng(1), label=0, images=2, size=128)
    with lightbox_scp(backend, tmp_path / "scp.log", LIGHTBOX_SCP_MIN_FREE_MB="1e12") as port:
        statuses = _send_all(port, [pydicom.dcmread(p) for p in study.paths])
        sent = run_dcmtk("storescu", "-aet", "STORESCU", "-aec", "LIGHTBOX", "127.0.0.1",
                         str(port), str(study.paths[0]))
    assert set(statuses.values()) == {OUT_OF_RESOURCES}
    assert sent.returncode != 0  # storescu reports the failed store in its exit code
    assert _rows(backend) == {}
    assert not any(backend.settings.storage_dir.rglob("*.dcm"))
    assert _leftovers(backend) == []


def _instance(rng: np.random.Generator, template: pydicom.Dataset, size: int) -> pydicom.Dataset:
    ds = copy.deepcopy(template)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = size
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


@pytest.mark.slow  # a fault (a full disk) under a real `lightbox scp`
def test_full_disk_nothing_half_registered(sqlite_backend: Backend, tmp_path: Path) -> None:
    require_that(os.geteuid() == 0, "root", "mounting a small tmpfs as storage needs root "
                 "(CI runs as root)")
    storage = sqlite_backend.settings.storage_dir
    storage.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(storage)],
                             capture_output=True, text=True)
    require_that(mounted.returncode == 0, "a tmpfs mount",
                 f"cannot mount tmpfs here: {mounted.stderr.strip()}")
    try:
        rng = np.random.default_rng(2)
        study = write_study(tmp_path / "study", rng, label=0, images=1, size=64)
        template = pydicom.dcmread(study.paths[0])
        # ~200 KB each: the fifth or sixth fills the 1 MiB tmpfs mid-write.
        datasets = [_instance(rng, template, 320) for _ in range(8)]
        with lightbox_scp(sqlite_backend, tmp_path / "scp.log",
                          LIGHTBOX_SCP_MIN_FREE_MB="0") as port:
            statuses = _send_all(port, datasets)
            accepted = {uid for uid, status in statuses.items() if status == 0x0000}
            # The reply precedes the row (the spool's registrar commits batches): wait for it.
            rows = wait_for(lambda: (r := _rows(sqlite_backend)).keys() >= accepted and r, 60,
                            what="rows for every accepted instance")
        stored = {p.stem for p in storage.rglob("*.dcm")}
        assert OUT_OF_RESOURCES in statuses.values()
        assert 0x0000 in statuses.values()
        for uid, status in statuses.items():
            if status == 0x0000:
                assert uid in rows and uid in stored and stored_file(
                    sqlite_backend.settings, rows[uid] or "").is_file()
            else:
                assert status == OUT_OF_RESOURCES
                assert uid not in rows and uid not in stored
        assert [p for p in storage.rglob("*") if p.is_file() and p.suffix != ".dcm"
                and p.parent.name != ".spool"] == []
        assert _leftovers(sqlite_backend) == []
    finally:
        subprocess.run(["umount", "-l", str(storage)], capture_output=True)
