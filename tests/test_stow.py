"""STOW-RS on what `lightbox api` serves (in a thread, real HTTP): token required, a result per
instance, the same registration path (``source = "stow"``); and Orthanc's DICOMweb client as a
real STOW peer."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from db.models import Instance, QuarantinedFile
from db.session import session_scope
from lightbox.synthetic import real_chest_crs, write_study
from tests.conftest import Backend, api_in_thread
from tests.pacs_peers import orthanc, require_dicomweb

TOKEN = "test-token-" + uuid.uuid4().hex


@contextmanager
def _api(backend: Backend) -> Iterator[str]:
    """What `lightbox api` serves, in a thread of this process (real HTTP): its answers are the
    point here; test_limits measures the process."""
    with api_in_thread(backend.settings.model_copy(update={"api_token": TOKEN})) as url:
        yield url


def _multipart(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + part + b"\r\n" for part in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_stow_per_instance_results(backend: Backend, tmp_path: Path) -> None:
    _, real = real_chest_crs(tmp_path / "real")
    synthetic = write_study(tmp_path / "syn", np.random.default_rng(9), label=0, images=1,
                            size=128)
    good = [*real, *synthetic.paths]
    uids = [str(pydicom.dcmread(p).SOPInstanceUID) for p in good]
    body, content_type = _multipart([p.read_bytes() for p in good] + [b"not dicom at all"])
    with _api(backend) as url:
        denied = httpx.post(url + "/dicom-web/studies", content=body, timeout=60,
                            headers={"Content-Type": content_type})
        wrong = httpx.post(url + "/dicom-web/studies", content=body, timeout=60,
                           headers={"Content-Type": content_type,
                                    "Authorization": "Bearer nope"})
        assert (denied.status_code, wrong.status_code) == (401, 401)
        with session_scope(backend.settings.sqlalchemy_url) as session:
            assert session.scalars(select(Instance)).first() is None
        response = httpx.post(url + "/dicom-web/studies", content=body, timeout=120,
                              headers={"Content-Type": content_type, "Accept":
                                       "application/dicom+json",
                                       "Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 202, response.text
    result = response.json()
    stored = [item["00081155"]["Value"][0] for item in result["00081199"]["Value"]]
    failed = result["00081198"]["Value"]
    assert stored == uids
    assert [item["00081197"]["Value"][0] for item in failed] == [0xC210]
    with session_scope(backend.settings.sqlalchemy_url) as session:
        rows = {i.sop_instance_uid: i.source for i in session.scalars(select(Instance))}
        quarantined = list(session.scalars(select(QuarantinedFile.reason_code)))
    assert rows == {uid: "stow" for uid in uids}
    assert quarantined == ["not_dicom"]


@pytest.mark.slow
def test_orthanc_stow_client(sqlite_backend: Backend, tmp_path: Path) -> None:
    require_dicomweb()
    study = write_study(tmp_path / "syn", np.random.default_rng(10), label=1, images=3, size=96)
    with _api(sqlite_backend) as url:
        servers = {"lightbox": {"Url": f"{url}/dicom-web/",
                                "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}}
        with orthanc(tmp_path / "orthanc", dicomweb_servers=servers) as pacs:
            study_id = {pacs.upload(p)["ParentStudy"] for p in study.paths}.pop()
            pacs.post("/dicom-web/servers/lightbox/stow", {"Resources": [study_id]})
    with session_scope(sqlite_backend.settings.sqlalchemy_url) as session:
        rows = {i.sop_instance_uid: i.source for i in session.scalars(select(Instance))}
    assert rows == {uid: "stow" for uid in study.sop_instance_uids}
