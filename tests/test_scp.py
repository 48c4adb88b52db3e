"""`lightbox scp` against real senders: dcmtk storescu/dcmsend/echoscu and pynetdicom.

Uncompressed and JPEG 2000 (the real chest CRs from pydicom-data) arrive, are stored byte for
byte as received, registered with ``source = scp:<calling AE>``, and processed into findings
by a real scheduler and worker; callers not allowed are rejected at association."""

from __future__ import annotations

import io
import os
import signal
import ssl
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts
from sqlalchemy import func, select

from db.models import Event, Finding, Instance, Job, JobState, QuarantinedFile, Study
from db.session import session_scope
from lightbox.roots import stored_file
from lightbox.synthetic import real_chest_crs, write_study
from tests.conftest import Backend, stop_processes, wait_for
from tests.pacs_peers import lightbox_scp, require, run_dcmtk

J2K = "1.2.840.10008.1.2.4.90"


def _instances(backend: Backend) -> dict[str, Instance]:
    with session_scope(backend.settings.sqlalchemy_url) as session:
        return {i.sop_instance_uid: i for i in session.scalars(select(Instance))}


def _wait_instances(backend: Backend, uids: set[str]) -> dict[str, Instance]:
    """The reply precedes the row (the spool's registrar commits batches): wait for them."""
    return wait_for(lambda: (rows := _instances(backend)).keys() >= uids and rows, 60,
                    what=f"{len(uids)} instance rows")


def _pixels(path: Path) -> tuple[str, bytes]:
    ds = pydicom.dcmread(path)
    return str(ds.file_meta.TransferSyntaxUID), bytes(ds.PixelData)


@pytest.mark.slow
def test_storescu_and_dcmsend_to_findings(backend: Backend, registered_model: tuple[int, str],
                                          tmp_path: Path) -> None:
    require("storescu", "dcmsend")
    logs = tmp_path / "logs"
    logs.mkdir()
    rng = np.random.default_rng(3)
    synthetic = write_study(tmp_path / "synthetic", rng, label=1, images=2, size=256)
    real_uid, real_paths = real_chest_crs(tmp_path / "real")
    ct = Path(get_testdata_file("CT_small.dcm"))
    with lightbox_scp(backend, logs / "scp.log", callers="STORESCU,DCMSEND") as port:
        procs = [backend.spawn("worker", log=logs / "worker.log"),
                 backend.spawn("scheduler", log=logs / "scheduler.log")]
        try:
            sent = run_dcmtk("storescu", "-aet", "STORESCU", "-aec", "LIGHTBOX", "127.0.0.1",
                             str(port), str(ct), *map(str, synthetic.paths))
            assert sent.returncode == 0, sent.stderr
            # dcmsend negotiates each file's own transfer syntax: JPEG 2000 stays JPEG 2000.
            sent = run_dcmtk("dcmsend", "-aet", "DCMSEND", "-aec", "LIGHTBOX", "127.0.0.1",
                             str(port), *map(str, real_paths))
            assert sent.returncode == 0, sent.stderr
            expected = {**{uid: "scp:STORESCU" for uid in synthetic.sop_instance_uids},
                        **{str(pydicom.dcmread(p).SOPInstanceUID): "scp:DCMSEND"
                           for p in real_paths}}
            rows = _wait_instances(backend, set(expected))
            assert {uid: rows[uid].source for uid in expected} == expected
            for path in real_paths:
                uid = str(pydicom.dcmread(path).SOPInstanceUID)
                # Stored as received: identical pixel bytes, JPEG 2000 kept compressed.
                stored_syntax, stored_pixels = _pixels(stored_file(backend.settings,
                                                                   rows[uid].stored_path))
                source_syntax, source_pixels = _pixels(path)
                assert stored_pixels == source_pixels
                assert stored_syntax == rows[uid].transfer_syntax_uid
                if source_syntax == J2K:
                    assert stored_syntax == J2K
            assert J2K in {rows[u].transfer_syntax_uid for u in expected}

            url = backend.settings.sqlalchemy_url

            def real_findings() -> list[Finding]:
                with session_scope(url) as session:
                    jobs = session.scalars(select(Job).join(Study).where(
                        Study.study_instance_uid == real_uid)).all()
                    if not jobs or not all(j.state.terminal for j in jobs):
                        return []
                    assert {j.state for j in jobs} == {JobState.succeeded}
                    return list(session.scalars(select(Finding).where(
                        Finding.job_id.in_([j.id for j in jobs]))))

            findings = wait_for(real_findings, 240, what="findings for the real chest CRs")
            assert {f.sop_instance_uid for f in findings} == {
                str(pydicom.dcmread(p).SOPInstanceUID) for p in real_paths}
        finally:
            stop_processes(procs)


# pydicom's test files, one per compressed transfer syntax the SCP must take as it comes.
COMPRESSED_FILES = ["SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm", "JPEG-LL.dcm",
                    "emri_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                    "MR_small_RLE.dcm", "image_dfl.dcm"]


def test_compressed_syntaxes_stored_as_received(sqlite_backend: Backend, tmp_path: Path) -> None:
    """JPEG baseline and extended, JPEG lossless, JPEG-LS, JPEG 2000, RLE and deflate, each
    sent by dcmsend in its own transfer syntax over one association, its compressed pixel
    data stored as sent (no decompression, no re-encoding) and registered with that syntax."""
    require("dcmsend")
    sent: dict[str, tuple[Path, str]] = {}
    for name in COMPRESSED_FILES:
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        sent[str(ds.SOPInstanceUID)] = (path, str(ds.file_meta.TransferSyntaxUID))
    assert len({syntax for _, syntax in sent.values()}) == len(COMPRESSED_FILES)
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log") as port:
        result = run_dcmtk("dcmsend", "--decompress-never", "-aet", "DCMSEND", "-aec",
                           "LIGHTBOX", "127.0.0.1", str(port), *(str(path) for path, _ in sent.values()))
        assert result.returncode == 0, result.stderr
        rows = _wait_instances(sqlite_backend, set(sent))
    assert {uid: rows[uid].transfer_syntax_uid for uid in sent} == {
        uid: syntax for uid, (_, syntax) in sent.items()}
    # dcmtk re-serialises the data set it sends (lengths, padding), so the sent file is not
    # byte-equal to what arrives; the compressed pixel data is, and stays compressed.
    differing = [path.name for uid, (path, _) in sent.items()
                 if _pixels(stored_file(sqlite_backend.settings, rows[uid].stored_path))
                 != _pixels(path)]
    assert differing == []


def test_unknown_callers_rejected(sqlite_backend: Backend, tmp_path: Path) -> None:
    require("echoscu", "storescu")
    ct = str(get_testdata_file("CT_small.dcm"))
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log",
                      callers="STORESCU, PINNED@10.255.255.1") as port:
        ok = run_dcmtk("echoscu", "-aet", "STORESCU", "-aec", "LIGHTBOX", "127.0.0.1", str(port))
        assert ok.returncode == 0, ok.stderr
        for title in ("INTRUDER", "PINNED"):  # unknown title; known title from the wrong host
            refused = run_dcmtk("storescu", "-aet", title, "-aec", "LIGHTBOX", "127.0.0.1",
                                str(port), ct)
            assert refused.returncode != 0
            assert "Association Rejected" in refused.stderr
            assert "Calling AE Title Not Recognized" in refused.stderr
    assert _instances(sqlite_backend) == {}


def test_concurrent_associations(sqlite_backend: Backend, tmp_path: Path) -> None:
    require("storescu")
    rng = np.random.default_rng(5)
    studies = [write_study(tmp_path / f"s{i}", rng, label=i % 2, images=6, size=128)
               for i in range(4)]
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log") as port:
        def send(i: int) -> subprocess.CompletedProcess[str]:
            return run_dcmtk("storescu", "-aet", f"MOD{i}", "-aec", "LIGHTBOX", "127.0.0.1",
                             str(port), *map(str, studies[i].paths))

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(send, range(4)))
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        rows = _wait_instances(sqlite_backend, {u for s in studies for u in s.sop_instance_uids})
    for i, study in enumerate(studies):
        assert {rows[u].source for u in study.sop_instance_uids} == {f"scp:MOD{i}"}
    assert len(rows) == 24


def _store(port: int, ds: pydicom.Dataset, priority: int = 2,
           **associate_kwargs: object) -> int | None:
    ae = AE(ae_title="PYNETDICOM")
    ae.requested_contexts = StoragePresentationContexts[:100]
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX", **associate_kwargs)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds, priority=priority)
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def test_cannot_understand_is_quarantined(sqlite_backend: Backend, tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = "not-a-uid"
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log") as port:
        assert _store(port, ds) == 0xC210
    with session_scope(sqlite_backend.settings.sqlalchemy_url) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
        reasons = list(session.scalars(select(QuarantinedFile.reason)))
    assert reasons == ["invalid StudyInstanceUID (not a DICOM UID)"]


def test_tls(sqlite_backend: Backend, tmp_path: Path) -> None:
    require("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log", LIGHTBOX_SCP_TLS_CERT=str(cert),
                      LIGHTBOX_SCP_TLS_KEY=str(key)) as port:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        assert _store(port, ds, tls_args=(client, "localhost")) == 0x0000
        assert _store(port, ds) is None  # plain DICOM is not spoken on the TLS port
        assert _wait_instances(sqlite_backend, {ds.SOPInstanceUID})


def test_high_priority_is_recorded(sqlite_backend: Backend, tmp_path: Path) -> None:
    urgent = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    routine = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log") as port:
        assert _store(port, urgent, priority=1) == 0x0000
        assert _store(port, routine) == 0x0000
    with session_scope(sqlite_backend.settings.sqlalchemy_url) as session:
        events = [(e.study_instance_uid, e.detail["sop_instance_uid"]) for e in session.scalars(
            select(Event).where(Event.kind == "cstore_high_priority"))]
    assert events == [(urgent.StudyInstanceUID, urgent.SOPInstanceUID)]


def test_allowed_callers_must_be_configured() -> None:
    """An SCP with no caller list would accept anyone: it refuses to start instead."""
    from lightbox.errors import ConfigurationError
    from scheduler.ingest.scp import Caller, parse_callers

    with pytest.raises(ConfigurationError, match="LIGHTBOX_SCP_ALLOWED_CALLERS"):
        parse_callers("")
    with pytest.raises(ConfigurationError, match="invalid allowed caller"):
        parse_callers("A_TITLE_LONGER_THAN_16")
    assert parse_callers(" PACS , CT1@10.0.0.7 ") == [Caller("PACS"), Caller("CT1", "10.0.0.7")]
    assert parse_callers("*") is None


def _registrar(port: int) -> psutil.Process:
    """The spool registrar: the spawned child of the `lightbox scp` listening on ``port``."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "scp" in cmdline and "cli.main" in " ".join(cmdline):
            try:
                if proc.environ().get("LIGHTBOX_SCP_PORT") != str(port):
                    continue
            except psutil.Error:
                continue
            children = [c for c in proc.children() if "spawn_main" in " ".join(c.cmdline())]
            if children:
                return children[0]
    raise AssertionError(f"no registrar process for the SCP on port {port}")


@pytest.mark.slow
def test_killed_registrar_process_is_replaced(sqlite_backend: Backend, tmp_path: Path) -> None:
    """Registration runs in a process of its own; if it dies, a new one takes over and the
    SCP goes on acknowledging and registering."""
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log") as port:
        first = _registrar(port)
        first.kill()
        first.wait(10)
        uids = set()
        for _ in range(3):
            ct.SOPInstanceUID = pydicom.uid.generate_uid()
            assert _store(port, ct) == 0x0000
            uids.add(str(ct.SOPInstanceUID))
        _wait_instances(sqlite_backend, uids)
        second = _registrar(port)
        assert second.pid != first.pid and second.is_running()
    assert "spool registrar process ended" in (tmp_path / "scp.log").read_text()


@pytest.mark.slow
def test_ctrl_c_registers_everything_acknowledged(sqlite_backend: Backend,
                                                 tmp_path: Path) -> None:
    """Ctrl-C reaches the SCP's whole process group. The registrar does not die halfway: the
    SCP's shutdown drains it, so every acknowledged instance has its row when `lightbox scp`
    exits (not only after the next start's spool recovery)."""
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uids = set()
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log") as port:
        scp = _registrar(port).parent()
        for _ in range(12):
            ct.SOPInstanceUID = pydicom.uid.generate_uid()
            assert _store(port, ct) == 0x0000
            uids.add(str(ct.SOPInstanceUID))
        os.killpg(scp.pid, signal.SIGINT)
        assert scp.wait(60) == 0
    assert uids <= set(_instances(sqlite_backend))
    assert "KeyboardInterrupt" not in (tmp_path / "scp.log").read_text()


@pytest.mark.parametrize("sop_instance", ["1.2.3", "1.2.34", "1.2.826.0.1.3680043.8.498.1",
                                          "1.2.999", "1.2.abc"])
def test_cached_part10_prefix_equals_pynetdicoms_file_meta(sop_instance: str) -> None:
    """The per-association template gives the bytes that encoding ``event.file_meta`` gives:
    odd and even UID lengths (padding), a placeholder that collides with another value
    ("999" in the SOP class) and a malformed UID (both encoded the slow way)."""
    from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless
    from pynetdicom.dsutils import create_file_meta

    from scheduler.ingest.scp import part10, part10_prefix

    for sop_class, syntax in (("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian),
                              ("1.2.999", JPEG2000Lossless)):
        meta = create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
                                transfer_syntax=UID(syntax))
        expected = part10(meta, b"", "MOD1", "LIGHTBOX")
        for _ in range(2):  # the first call fills the cache, the second uses it
            prefix = part10_prefix(sop_class, sop_instance, syntax, "MOD1", "LIGHTBOX")
            assert prefix == expected
        read = pydicom.dcmread(io.BytesIO(prefix))
        assert read.file_meta.MediaStorageSOPInstanceUID == sop_instance
        assert read.file_meta.SendingApplicationEntityTitle == "MOD1"


def _response_primitive(message_id: int, sop_class: str, sop_instance: str, status: int,
                        **extra: object) -> object:
    """A C-STORE response primitive as pynetdicom's storage SCP builds it."""
    from pynetdicom.dimse_primitives import C_STORE

    rsp = C_STORE()
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPInstanceUID, rsp.AffectedSOPClassUID = sop_instance, sop_class
    rsp.Status = status
    for name, value in extra.items():
        setattr(rsp, name, value)
    return rsp


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC210])
@pytest.mark.parametrize("sop_instance", ["1.2.3", "1.2.34", "1.2.826.0.1.3680043.8.498.1"])
def test_cached_store_reply_equals_pynetdicoms_encoding(status: int, sop_instance: str) -> None:
    """Template replies are byte-equal to pynetdicom's own, for odd and even UID lengths and
    the statuses the SCP sends, and decode to the request's message ID and UID."""
    from pydicom.filereader import read_dataset

    from scheduler.ingest.scp_replies import pynetdicom_response_pdv, store_response_pdv

    ct = "1.2.840.10008.5.1.4.1.1.2"
    for message_id in (0, 1, 0x5A5A, 65535):
        expected = pynetdicom_response_pdv(message_id, ct, sop_instance, status)
        cached = store_response_pdv(_response_primitive(message_id, ct, sop_instance, status))
        assert cached == expected
        assert cached is not None and cached[0] == 0x03  # last fragment of a command set
        command = read_dataset(io.BytesIO(cached[1:]), is_implicit_VR=True,
                               is_little_endian=True)
        assert command.MessageIDBeingRespondedTo == message_id
        assert command.AffectedSOPInstanceUID == sop_instance
        assert command.Status == status and command.CommandField == 0x8001


@pytest.mark.parametrize(("sop_class", "sop_instance", "extra"), [
    ("1.2.999", "1.2", {}),  # placeholder "999" also in the SOP class
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.abc", {}),  # not a DICOM UID
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3", {"ErrorComment": "disk full"}),
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3", {"OffendingElement": [0x00100010]}),
])
def test_replies_the_template_does_not_cover_go_pynetdicoms_way(
        sop_class: str, sop_instance: str, extra: dict[str, object]) -> None:
    from scheduler.ingest.scp_replies import store_response_pdv

    rsp = _response_primitive(7, sop_class, sop_instance, 0xA700, **extra)
    assert store_response_pdv(rsp) is None


def test_scp_replies_carry_each_requests_message_id_and_uid(sqlite_backend: Backend,
                                                            tmp_path: Path) -> None:
    """Over one association to a real `lightbox scp` (cached replies on at INFO): every
    C-STORE-RSP answers its own request."""
    from pynetdicom import evt

    replies: list[tuple[int, str, int]] = []

    def on_dimse(event: evt.Event) -> None:
        command = event.message.command_set
        if command.CommandField == 0x8001:
            replies.append((int(command.MessageIDBeingRespondedTo),
                            str(command.AffectedSOPInstanceUID), int(command.Status)))

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    sent = []
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log") as port:
        ae = AE(ae_title="PYNETDICOM")
        ae.requested_contexts = StoragePresentationContexts[:100]
        assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX",
                             evt_handlers=[(evt.EVT_DIMSE_RECV, on_dimse)])
        assert assoc.is_established
        try:
            for message_id, uid in ((1, "1.2.3.4"), (300, "1.2.3.45"), (65535, "1.2.3.456")):
                source.SOPInstanceUID = uid
                status = assoc.send_c_store(source, msg_id=message_id)
                assert status.Status == 0x0000
                sent.append((message_id, uid, 0x0000))
        finally:
            assoc.release()
        _wait_instances(sqlite_backend, {uid for _, uid, _ in sent})
    assert replies == sent


def test_pynetdicom_log_handlers_follow_the_log_level() -> None:
    """Per-message log handlers (and so the pynetdicom reply path) only at DEBUG."""
    from pynetdicom import _config

    from scheduler.ingest.scp_replies import quiet_standard_handlers

    before = _config.LOG_HANDLER_LEVEL
    try:
        assert quiet_standard_handlers("info") and _config.LOG_HANDLER_LEVEL == "none"
        assert not quiet_standard_handlers("DEBUG") and _config.LOG_HANDLER_LEVEL == "standard"
    finally:
        _config.LOG_HANDLER_LEVEL = before
