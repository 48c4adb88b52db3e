"""Real DICOM peers for the PACS tests: dcmtk tools, an Orthanc server, our own `lightbox scp`.

Everything runs on loopback on free ports. Tests that need a binary that is missing skip with
the reason, and fail under ``CI=true`` (:mod:`tests.peers`; .ci/run installs dcmtk, orthanc,
orthanc-dicomweb, dicom3tools and openssl).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests import peers
from tests.conftest import Backend, stop_processes, wait_for

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def require(*binaries: str) -> None:
    """Each binary on PATH, else skip (fail under ``CI=true``: :func:`tests.peers.require`)."""
    for binary in binaries:
        peers.require(binary, "apt-get install dcmtk orthanc orthanc-dicomweb dicom3tools "
                              "openssl; .ci/run does")


def require_dicomweb() -> None:
    """Orthanc's DICOMweb plugin (STOW-RS client and server), else skip / fail in CI."""
    require("Orthanc")
    peers.require_that(DICOMWEB_PLUGIN.exists(), f"the orthanc-dicomweb plugin ({DICOMWEB_PLUGIN})",
                       "apt-get install orthanc-dicomweb; .ci/run does")


def ct_instances(count: int) -> list[pydicom.Dataset]:
    """``count`` instances of one new CT study and series (pydicom's CT_small, new UIDs)."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    template.StudyInstanceUID, template.SeriesInstanceUID = generate_uid(), generate_uid()
    out = []
    for _ in range(count):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(ds)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    """dcmtk waits for delayed ACKs on loopback without TCP_NODELAY (40 ms per PDU)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def run_dcmtk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), env=dcmtk_env(), capture_output=True, text=True,
                          timeout=timeout)


def echo_ok(port: int, calling: str = "ECHOSCU", called: str = "LIGHTBOX") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def with_env(backend: Backend, **env: str) -> Backend:
    return replace(backend, env={**backend.env, **env})


@contextmanager
def lightbox_scp(backend: Backend, log: Path, *, port: int | None = None,
                 callers: str = "*", ae_title: str = "LIGHTBOX",
                 **env: str) -> Iterator[int]:
    """A real `lightbox scp` process; yields its port once it answers C-ECHO."""
    port = port or free_port()
    peer = with_env(backend, LIGHTBOX_SCP_PORT=str(port), LIGHTBOX_SCP_AE_TITLE=ae_title,
                    LIGHTBOX_SCP_ALLOWED_CALLERS=callers, LIGHTBOX_SCP_BIND_ADDRESS="127.0.0.1",
                    **env)
    proc = peer.spawn("scp", log=log)
    try:
        if "LIGHTBOX_SCP_TLS_CERT" in env:
            wait_for(lambda: _port_open(port) or proc.poll() is not None, 60,
                     what="lightbox scp (TLS) listening")
        else:
            echo_title = callers.split(",")[0].split("@")[0].strip() if callers != "*" else "X"
            wait_for(lambda: proc.poll() is not None or echo_ok(port, echo_title, ae_title), 60,
                     what="lightbox scp answering C-ECHO")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield port
    finally:
        stop_processes([proc])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Orthanc:
    """A real Orthanc server (with the DICOMweb plugin when installed), REST without auth."""

    http_port: int
    dicom_port: int
    ae_title: str
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def upload(self, path: Path) -> dict[str, str]:
        response = httpx.post(f"{self.url}/instances", content=path.read_bytes(), timeout=60)
        response.raise_for_status()
        return response.json()

    def get(self, route: str) -> object:
        response = httpx.get(f"{self.url}{route}", timeout=60)
        response.raise_for_status()
        return response.json()

    def post(self, route: str, body: object) -> object:
        response = httpx.post(f"{self.url}{route}", json=body, timeout=120)
        response.raise_for_status()
        return response.json()

    def file(self, instance_id: str) -> bytes:
        response = httpx.get(f"{self.url}/instances/{instance_id}/file", timeout=60)
        response.raise_for_status()
        return response.content

    def find_instances(self, **query: str) -> list[str]:
        found = self.post("/tools/find", {"Level": "Instance", "Query": query})
        assert isinstance(found, list)
        return [str(x) for x in found]


@contextmanager
def orthanc(tmp: Path, *, modalities: dict[str, list[object]] | None = None,
            ae_title: str = "ORTHANC", dicomweb_servers: dict[str, object] | None = None
            ) -> Iterator[Orthanc]:
    """Start Orthanc with a generated config in ``tmp`` (own ports, storage in tmp)."""
    require("Orthanc")
    tmp.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "lightbox-test", "StorageDirectory": str(tmp / "storage"),
        "IndexDirectory": str(tmp / "storage"), "HttpPort": http_port,
        "DicomPort": dicom_port, "DicomAet": ae_title, "RemoteAccessAllowed": True,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
        "DicomModalities": modalities or {}, "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True, "DicomAlwaysAllowGet": True,
        "DicomScpTimeout": 30, "StableAge": 1, "HttpTimeout": 60,
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/",
                     "Servers": dicomweb_servers or {}},
        "StorageCompression": False, "OverwriteInstances": True,
    }
    (tmp / "orthanc.json").write_text(json.dumps(config, indent=1))
    log = (tmp / "orthanc.log").open("ab")
    proc = subprocess.Popen(["Orthanc", str(tmp / "orthanc.json")], stdout=log,
                            stderr=subprocess.STDOUT, env=dcmtk_env(), start_new_session=True)
    server = Orthanc(http_port, dicom_port, ae_title, proc)
    try:
        wait_for(lambda: proc.poll() is not None or _http_ok(server.url + "/system"), 60,
                 what="Orthanc HTTP up")
        assert proc.poll() is None, (tmp / "orthanc.log").read_text()[-3000:]
        yield server
    finally:
        stop_processes([proc])
        log.close()


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's "Error" lines for a file (an empty list means it validates)."""
    require("dciodvfy")
    assert Path(path).is_file(), f"no file to validate at {path}"  # dciodvfy says no Error then
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("Error")]

