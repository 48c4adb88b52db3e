"""STOW-RS on a real `lightbox api` process: token required, a result per instance, the same
registration path (``source = "stow"``); and Orthanc's DICOMweb client as a real STOW peer."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from db.models import Instance, QuarantinedFile
from db.session import session_scope
from lightbox.synthetic import real_chest_crs, write_study
from tests.conftest import Backend, stop_processes, wait_for
from tests.pacs_peers import free_port, orthanc, require_dicomweb, with_env

TOKEN = "test-token-" + uuid.uuid4().hex


def _api(backend: Backend, tmp_path: Path) -> tuple[object, str]:
    port = free_port()
    proc = with_env(backend, LIGHTBOX_API_TOKEN=TOKEN, LIGHTBOX_API_PORT=str(port)).spawn(
        "api", log=tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    wait_for(up, 60, what="lightbox api up")
    assert proc.poll() is None, (tmp_path / "api.log").read_text()[-2000:]
    return proc, url


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
    proc, url = _api(backend, tmp_path)
    try:
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
    finally:
        stop_processes([proc])
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
    proc, url = _api(sqlite_backend, tmp_path)
    try:
        servers = {"lightbox": {"Url": f"{url}/dicom-web/",
                                "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}}
        with orthanc(tmp_path / "orthanc", dicomweb_servers=servers) as pacs:
            study_id = {pacs.upload(p)["ParentStudy"] for p in study.paths}.pop()
            pacs.post("/dicom-web/servers/lightbox/stow", {"Resources": [study_id]})
    finally:
        stop_processes([proc])
    with session_scope(sqlite_backend.settings.sqlalchemy_url) as session:
        rows = {i.sop_instance_uid: i.source for i in session.scalars(select(Instance))}
    assert rows == {uid: "stow" for uid in study.sop_instance_uids}
