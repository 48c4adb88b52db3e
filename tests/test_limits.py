"""Memory bounds on every input channel (README "Limits"), each attack against a real process.

Each test measures the attacked process's peak RSS (psutil, sampled from here, and the
kernel's high-water mark, VmHWM) and asserts a bound the unbounded code broke by hundreds of
MB; and that an allowed caller is answered while the attack goes on. Attack sizes are modest
(declared large, sent only until refused; bombs of a few hundred MB inflated)."""

from __future__ import annotations

import io
import select
import shutil
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE
from sqlalchemy import func
from sqlalchemy import select as sql_select

from db.models import Instance, QuarantinedFile
from db.session import session_scope
from tests.conftest import Backend, stop_processes, wait_for
from tests.pacs_peers import free_port, lightbox_scp, with_env

MB = 1 << 20
ALLOWED = "ALLOWED"
TOKEN = "test-token-" + uuid.uuid4().hex
ATTACKER = "127.0.0.2"  # loopback, another peer address than the allowed caller's
PER_HOST = 8  # LIGHTBOX_SCP_MAX_CONNECTIONS_PER_HOST, default


class PeakRss:
    """The peak RSS of a process: sampled with psutil, and the kernel's VmHWM (which no
    sampling interval can miss), both in MB, growth over the RSS when sampling started."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    def high_water(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            line = next(x for x in status if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.peak = max(self.peak, self.high_water())
        except (OSError, StopIteration):
            pass

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / MB


def _quarantined(backend: Backend) -> int:
    with session_scope(backend.settings.sqlalchemy_url) as session:
        return int(session.scalar(sql_select(func.count()).select_from(QuarantinedFile)) or 0)


def _instances(backend: Backend) -> int:
    with session_scope(backend.settings.sqlalchemy_url) as session:
        return int(session.scalar(sql_select(func.count()).select_from(Instance)) or 0)


def _scp_pid(port: int) -> int:
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            assert conn.pid is not None
            return conn.pid
    raise AssertionError(f"nothing listens on {port}")


def _store(port: int, path: Path, syntax: str) -> int:
    """C-STORE one file as an allowed caller; the status."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title=ALLOWED)
    ae.add_requested_context(ds.SOPClassUID, [syntax])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


def _echo(port: int) -> bool:
    ae = AE(ae_title=ALLOWED)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


def _connect_as_attacker(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((ATTACKER, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _flood(port: int, declared: int, *, chunk: int = MB) -> tuple[int, bytes]:
    """An A-ASSOCIATE-RQ header declaring ``declared`` bytes, then zeros until the SCP answers
    or closes; (bytes sent, what came back)."""
    sock = _connect_as_attacker(port)
    sock.setblocking(False)
    sent, reply = 0, b""
    header = b"\x01\x00" + struct.pack(">L", declared)
    zeros = memoryview(bytes(chunk))
    pending = memoryview(header)
    deadline = time.monotonic() + 120
    try:
        while sent < declared + 6 and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 1)
            if readable:
                reply = sock.recv(64)
                break
            if writable:
                try:
                    count = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += count
                pending = pending[count:]
                if not pending:
                    pending = zeros[:min(chunk, declared + 6 - sent)]
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return sent, reply


@pytest.mark.slow  # an attack on a real process, its memory measured
def test_oversized_associate_request_is_aborted_after_its_header(sqlite_backend: Backend,
                                                                  tmp_path: Path) -> None:
    """Item 1: `01 00` + length 2^30 then zeros, on 4 connections at once: each gets an
    A-ABORT after the header; the SCP does not grow by the declared GiB; an allowed caller
    stores meanwhile."""
    ct = Path(get_testdata_file("CT_small.dcm"))
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log", callers=ALLOWED) as port:
        with PeakRss(_scp_pid(port)) as rss:
            results: list[tuple[int, bytes]] = []
            attackers = [threading.Thread(target=lambda: results.append(_flood(port, 2**30)))
                         for _ in range(4)]
            for thread in attackers:
                thread.start()
            statuses = [_store(port, ct, ExplicitVRLittleEndian) for _ in range(3)]
            for thread in attackers:
                thread.join()
    print(f"item 1: SCP peak RSS growth {rss.growth_mb:.0f} MB, sent per attack "
          f"{[sent // MB for sent, _ in results]} MB")
    assert statuses == [0, 0, 0]
    assert len(results) == 4
    for sent, reply in results:
        assert reply[:1] == b"\x07", f"expected an A-ABORT PDU: {results}"
        assert sent < 64 * MB, "the SCP kept reading the declared length"
    assert rss.growth_mb < 100


@pytest.mark.slow  # an attack on a real process, its memory measured
def test_oversized_data_pdu_is_aborted_after_its_header(sqlite_backend: Backend,
                                                         tmp_path: Path) -> None:
    """Item 1, once associated: a P-DATA-TF PDU declaring more than the maximum PDU length
    the SCP announced (LIGHTBOX_SCP_MAX_PDU_KB) gets an A-ABORT after its header."""
    ct = Path(get_testdata_file("CT_small.dcm"))
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log", callers=ALLOWED,
                      LIGHTBOX_SCP_MAX_PDU_KB="64") as port:
        with PeakRss(_scp_pid(port)) as rss:
            ae = AE(ae_title=ALLOWED)
            ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
            assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX")
            assert assoc.is_established
            assert assoc.acceptor.maximum_length == 64 * 1024
            raw = assoc.dul.socket.socket  # around pynetdicom, which would split the data
            assert raw is not None
            raw.sendall(b"\x04\x00" + struct.pack(">L", 2**30) + bytes(MB))
            wait_for(lambda: assoc.is_aborted, 60, what="A-ABORT from the SCP")
            assert _store(port, ct, ExplicitVRLittleEndian) == 0
    print(f"item 1 (P-DATA): SCP peak RSS growth {rss.growth_mb:.0f} MB")
    assert rss.growth_mb < 100


@pytest.mark.slow  # an attack on a real process, its memory measured
def test_idle_connections_from_one_host_do_not_lock_out_allowed_callers(
        sqlite_backend: Backend, tmp_path: Path) -> None:
    """Item 2: 16 connections that send nothing (all the association slots): those past the
    per-host limit are refused at once, the rest closed after the association timeout, and an
    allowed caller from another address is served meanwhile."""
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log", callers=ALLOWED,
                      LIGHTBOX_SCP_ASSOCIATION_TIMEOUT="4") as port:
        idle = [_connect_as_attacker(port) for _ in range(16)]
        try:
            time.sleep(0.5)
            assert _echo(port), "allowed caller locked out by idle connections"
            for sock in idle:
                sock.settimeout(30)
            refused = []
            for sock in idle:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    refused.append(sock.recv(64))
            assert len(refused) >= 16 - PER_HOST, "connections past the per-host limit stayed open"
            assert all(reply[:1] in (b"\x07", b"") for reply in refused)
            # The ones let in get nothing but a close after the association timeout.
            survivors = [s for s in idle if not select.select([s], [], [], 0)[0]]
            assert len(survivors) <= PER_HOST
            for sock in survivors:
                assert sock.recv(64) == b"", "idle connection not closed"
            assert _echo(port)
        finally:
            for sock in idle:
                sock.close()


def test_pynetdicom_internals_are_there() -> None:
    """scheduler/ingest/scp_guard.py leans on pynetdicom internals: fail loudly, naming the one that
    changed, rather than let the SCP go unbounded again after an upgrade."""
    import inspect

    from pynetdicom import AE as PynetdicomAE
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.fsm import TRANSITION_TABLE
    from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler

    reader = inspect.getsource(DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in reader and "self.socket.recv(pdu_length)" in reader, \
        "DULServiceProvider._read_pdu_data no longer reads header then body from the socket"
    assert "recv" in vars(AssociationSocket), "AssociationSocket.recv is gone"
    handler = inspect.getsource(RequestHandler._create_association)
    assert "AssociationSocket(assoc, client_socket=self.request)" in handler
    assert "assoc.set_socket(sock)" in handler
    assert "request_handler" in inspect.signature(AssociationServer.__init__).parameters
    make_server = inspect.signature(PynetdicomAE.make_server).parameters
    assert "server_class" in make_server and any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in make_server.values())
    assert isinstance(PynetdicomAE()._servers, list), "AE._servers is what shutdown() stops"
    assert TRANSITION_TABLE[("Evt19", "Sta2")] == "AA-1", "invalid PDU before association"
    assert TRANSITION_TABLE[("Evt19", "Sta6")] == "AA-8", "invalid PDU once associated"
    assert "active_associations" in vars(AssociationServer)
    assert "verify_request" in vars(socketserver.BaseServer)


@pytest.mark.slow  # an attack on a real process, its memory measured
def test_tls_connection_that_never_shakes_hands_does_not_stop_the_scp(
        sqlite_backend: Backend, tmp_path: Path) -> None:
    """Item 2 on TLS: the handshake runs in the accept loop; a peer that connects and sends
    nothing is dropped after LIGHTBOX_SCP_ASSOCIATION_TIMEOUT, and TLS callers get in."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log", callers=ALLOWED,
                      LIGHTBOX_SCP_TLS_CERT=str(cert), LIGHTBOX_SCP_TLS_KEY=str(key),
                      LIGHTBOX_SCP_ASSOCIATION_TIMEOUT="3") as port:
        silent = _connect_as_attacker(port)
        try:
            time.sleep(0.5)
            ae = AE(ae_title=ALLOWED)
            ae.add_requested_context("1.2.840.10008.1.1")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX",
                                 tls_args=(client, "localhost"))
            assert assoc.is_established, "a silent TLS connection stopped the SCP accepting"
            assert assoc.send_c_echo().Status == 0
            assoc.release()
            silent.settimeout(30)
            assert silent.recv(64) == b"", "the silent connection was not dropped"
        finally:
            silent.close()


def _part10(ds: Dataset, syntax: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _meta_end(part10: bytes) -> int:
    """Offset of the first data set byte: after the preamble and the file meta group."""
    return 144 + struct.unpack("<L", part10[140:144])[0]


def deflate_bomb(path: Path, side: int) -> Path:
    """A valid CT image, ``side`` × ``side`` 16-bit zeros, in Deflated Explicit VR Little
    Endian: a few hundred KB that inflate to ``2 * side**2`` bytes (written in chunks)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    deflated = _part10(ds, DeflatedExplicitVRLittleEndian)
    plain = _part10(ds, ExplicitVRLittleEndian)
    size = 2 * side * side
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as out:
        out.write(deflated[:_meta_end(deflated)])
        out.write(compressor.compress(plain[_meta_end(plain):]))
        out.write(compressor.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<L", size)))
        zeros = bytes(4 * MB)
        for start in range(0, size, len(zeros)):
            out.write(compressor.compress(zeros[:min(len(zeros), size - start)]))
        out.write(compressor.flush())
    return path


def j2k_lie(path: Path, side: int) -> Path:
    """pydicom-data's 6 KB JPEG 2000 MR (Rows/Columns 64) with its codestream's SIZ patched to
    declare ``side`` × ``side`` (Xsiz/Ysiz and the tile size XTsiz/YTsiz)."""
    data = bytearray(Path(get_testdata_file("MR_small_jp2klossless.dcm")).read_bytes())
    siz = data.index(b"\xff\x4f\xff\x51")
    data[siz + 8:siz + 16] = struct.pack(">2I", side, side)
    data[siz + 24:siz + 32] = struct.pack(">2I", side, side)
    path.write_bytes(bytes(data))
    return path


@contextmanager
def lightbox_api(backend: Backend, log: Path, **env: str) -> Iterator[tuple[str, int]]:
    """A real `lightbox api` process; its URL and pid."""
    port = free_port()
    proc = with_env(backend, LIGHTBOX_API_TOKEN=TOKEN, LIGHTBOX_API_PORT=str(port),
                    **env).spawn("api", log=log)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    try:
        wait_for(up, 60, what="lightbox api up")
        assert proc.poll() is None, log.read_text()[-2000:]
        yield url, proc.pid
    finally:
        stop_processes([proc])


def _multipart(parts: list[bytes], boundary: str) -> Iterator[bytes]:
    for part in parts:
        yield (b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
               + part + b"\r\n")
    yield b"--" + boundary.encode() + b"--\r\n"


def _stow(url: str, parts: list[bytes] | Iterator[bytes], *,
          boundary: str | None = None) -> httpx.Response:
    boundary = boundary or uuid.uuid4().hex
    body = _multipart(parts, boundary) if isinstance(parts, list) else parts
    return httpx.post(url + "/dicom-web/studies", content=body, timeout=300, headers={
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def _failures(response: httpx.Response) -> list[int]:
    failed = response.json().get("00081198", {}).get("Value", [])
    return [item["00081197"]["Value"][0] for item in failed]


def _in_subprocess(code: str, *args: str, env: dict[str, str]) -> tuple[str, float]:
    """Run ``code`` in a fresh interpreter (sampled with psutil); its output and the peak RSS
    growth (MB) over the interpreter after its imports (the code prints ``VmHWM`` itself)."""
    script = ("import sys\nfrom pathlib import Path\n" + code + "\n"
              "hwm = [l for l in Path('/proc/self/status').read_text().splitlines()"
              " if l.startswith('VmHWM')][0].split()[1]\n"
              "print('HWM', hwm)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=300)
    text = out.decode()
    assert proc.returncode == 0, text[-3000:]
    hwm = int(next(x for x in text.splitlines() if x.startswith("HWM")).split()[1]) * 1024
    base = int(next(x for x in text.splitlines() if x.startswith("BASE")).split()[1])
    return text, (hwm - base) / MB


BASE_LINE = ("import psutil, os\n"
             "print('BASE', psutil.Process(os.getpid()).memory_info().rss)\n")


@pytest.mark.slow  # an attack on a real process, its memory measured
def test_deflate_bomb_is_refused_on_every_channel(sqlite_backend: Backend,
                                                   tmp_path: Path) -> None:
    """Item 3: 280 KB that inflate to 288 MB (a valid 12000 × 12000 16-bit CT), with
    LIGHTBOX_MAX_INFLATED_MB=64: SCP 0xC210, STOW failure 0xC210, folder ingest and the
    worker's decode refuse it; none grows by the inflated size; allowed callers are served."""
    bomb = deflate_bomb(tmp_path / "bomb.dcm", 12000)
    assert bomb.stat().st_size < MB
    backend = with_env(sqlite_backend, LIGHTBOX_MAX_INFLATED_MB="64")
    ct = Path(get_testdata_file("CT_small.dcm"))
    with lightbox_scp(backend, tmp_path / "scp.log", callers=ALLOWED) as port:
        with PeakRss(_scp_pid(port)) as scp_rss:
            status = _store(port, bomb, DeflatedExplicitVRLittleEndian)
            assert _store(port, ct, ExplicitVRLittleEndian) == 0
    with lightbox_api(backend, tmp_path / "api.log") as (url, pid):
        with PeakRss(pid) as api_rss:
            stow = _stow(url, [bomb.read_bytes()])
            assert _stow(url, [ct.read_bytes()]).status_code == 200
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "bomb.dcm").write_bytes(bomb.read_bytes())
    ingest_out, ingest_growth = _in_subprocess(
        "from lightbox.settings import get_settings\n"
        "from scheduler.ingest.registration import register_file\n" + BASE_LINE +
        "r = register_file(get_settings(), Path(sys.argv[1]))\n"
        "print('OUTCOME', r.outcome.value, r.reason)\n",
        str(folder / "bomb.dcm"), env=backend.env)
    decode_out, decode_growth = _in_subprocess(
        "from lightbox.pixels import read_dataset, decode_frame\n"
        "from lightbox.errors import PixelDecodeError\n" + BASE_LINE +
        "try:\n    decode_frame(read_dataset(sys.argv[1]), (224, 224))\n"
        "    print('DECODED')\nexcept PixelDecodeError as exc:\n    print('REFUSED', exc)\n",
        str(bomb), env=backend.env)
    print(f"item 3: peak RSS growth SCP {scp_rss.growth_mb:.0f} MB, API "
          f"{api_rss.growth_mb:.0f} MB, folder ingest {ingest_growth:.0f} MB, worker decode "
          f"{decode_growth:.0f} MB")
    assert status == 0xC210
    assert stow.status_code == 409 and _failures(stow) == [0xC210]
    assert "OUTCOME quarantined" in ingest_out and "LIGHTBOX_MAX_INFLATED_MB" in ingest_out
    assert "REFUSED" in decode_out
    assert _quarantined(backend) == 3  # SCP, STOW, folder
    for growth in (scp_rss.growth_mb, api_rss.growth_mb, ingest_growth, decode_growth):
        assert growth < 100


@pytest.mark.slow  # an attack on a real process, its memory measured
def test_jpeg2000_declaring_a_larger_image_is_refused(sqlite_backend: Backend,
                                                      tmp_path: Path) -> None:
    """Item 4: a 6 KB JPEG 2000 file (Rows/Columns 64) whose SIZ declares 60000 × 60000:
    SCP 0xC210, STOW failure 0xC210 (quarantined), and the worker refuses it before the
    decoder allocates for it; allowed callers are served meanwhile."""
    lie = j2k_lie(tmp_path / "lie.dcm", 60000)
    honest = Path(get_testdata_file("MR_small_jp2klossless.dcm"))
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log", callers=ALLOWED) as port:
        status = _store(port, lie, JPEG2000Lossless)
        assert _store(port, honest, JPEG2000Lossless) == 0
    with lightbox_api(sqlite_backend, tmp_path / "api.log") as (url, _):
        stow = _stow(url, [lie.read_bytes()])
    decode_out, decode_growth = _in_subprocess(
        "from lightbox.pixels import read_dataset, decode_frame\n"
        "from lightbox.errors import PixelDecodeError\n" + BASE_LINE +
        "for reduce in ((224, 224), None):\n"
        "    try:\n        decode_frame(read_dataset(sys.argv[1]), reduce)\n"
        "        print('DECODED')\n"
        "    except PixelDecodeError as exc:\n        print('REFUSED', exc)\n",
        str(lie), env=sqlite_backend.env)
    print(f"item 4: worker decode peak RSS growth {decode_growth:.0f} MB")
    assert status == 0xC210
    assert stow.status_code == 409 and _failures(stow) == [0xC210]
    assert decode_out.count("REFUSED") == 2 and "DECODED" not in decode_out
    assert _quarantined(sqlite_backend) == 2
    assert decode_growth < 100


def _raw_post(url: str, headers: dict[str, str], body: Iterator[bytes]) -> tuple[int, bytes]:
    """POST by hand, sending until the server answers; (bytes sent, the response)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode())
    sock.setblocking(False)
    sent, response = 0, b""
    try:
        for chunk in body:
            view = memoryview(chunk)
            while view:
                readable, writable, _ = select.select([sock], [sock], [], 5)
                if readable:
                    raise StopIteration
                if writable:
                    count = sock.send(view)
                    sent += count
                    view = view[count:]
    except (StopIteration, BrokenPipeError, ConnectionResetError):
        pass
    sock.setblocking(True)
    sock.settimeout(30)
    try:
        while b"\r\n\r\n" not in response:
            data = sock.recv(4096)
            if not data:
                break
            response += data
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    return sent, response


@pytest.mark.slow  # an attack on a real process, its memory measured
def test_stow_streams_and_refuses_over_its_limits(sqlite_backend: Backend,
                                                  tmp_path: Path) -> None:
    """Item 5: one 200 MB part is streamed (the API does not grow by it) while another caller
    stores; a body over LIGHTBOX_STOW_MAX_BODY_MB gets 413 before it is read (declared, or
    sent without a length); more parts than LIGHTBOX_STOW_MAX_PARTS get 413 and quarantine
    nothing."""
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    backend = with_env(sqlite_backend, LIGHTBOX_STOW_MAX_BODY_MB="256",
                       LIGHTBOX_STOW_MAX_PARTS="100")
    with lightbox_api(backend, tmp_path / "api.log") as (url, pid):
        boundary = uuid.uuid4().hex
        line = b"0123456789abcdef" * 63 + b"\r\n"  # short lines, like the text attack

        def big_body() -> Iterator[bytes]:
            yield (b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n")
            for _ in range(200):
                yield line * 1024
            yield b"\r\n--" + boundary.encode() + b"--\r\n"

        with PeakRss(pid) as rss:
            big: list[httpx.Response] = []
            upload = threading.Thread(target=lambda: big.append(
                _stow(url, big_body(), boundary=boundary)))
            upload.start()
            small = [_stow(url, [ct]).status_code for _ in range(3)]
            upload.join()
            many = _stow(url, [b""] * 2000)
            declared = _raw_post(url, {
                "Authorization": f"Bearer {TOKEN}", "Content-Length": str(2**30),
                "Content-Type": f'multipart/related; type="application/dicom"; '
                                f'boundary={boundary}'}, iter([bytes(MB)] * 1024))
            chunked = _raw_post(url, {
                "Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked",
                "Content-Type": f'multipart/related; type="application/dicom"; '
                                f'boundary={boundary}'},
                (b"%x\r\n" % MB + bytes(MB) + b"\r\n" for _ in range(1024)))
    print(f"item 5: API peak RSS growth {rss.growth_mb:.0f} MB; sent before 413: declared "
          f"{declared[0] // MB} MB, chunked {chunked[0] // MB} MB")
    assert small == [200, 200, 200]
    assert big[0].status_code == 409 and _failures(big[0]) == [0xC210]
    assert many.status_code == 413
    assert _quarantined(backend) == 1  # the big part only; none of the 2,000
    assert declared[1].startswith(b"HTTP/1.1 413") and declared[0] < 300 * MB
    assert chunked[1].startswith(b"HTTP/1.1 413") and chunked[0] < 300 * MB
    assert rss.growth_mb < 150
    assert _instances(backend) == 1
