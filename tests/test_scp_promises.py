"""Two promises of `lightbox scp` checked where they could break: the data set is stored byte
for byte as it came off the wire (private tags and all), and with ``LIGHTBOX_SCP_TLS_CA`` set a
client without a certificate is refused."""

from __future__ import annotations

import io
import ssl
import struct
import subprocess
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from sqlalchemy import select

from db.models import Instance
from db.session import session_scope
from lightbox.roots import stored_file
from tests.conftest import Backend, wait_for
from tests.pacs_peers import lightbox_scp, require

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
PRIVATE_CREATOR = "LIGHTBOX TEST"
COMMENT = "as sent by the modality: keep me exactly"


def _instances(backend: Backend) -> dict[str, Instance]:
    with session_scope(backend.settings.sqlalchemy_url) as session:
        return {i.sop_instance_uid: i for i in session.scalars(select(Instance))}


def _wire_data_sets(sent_pdus: list[bytes]) -> list[bytes]:
    """The data set of each message the SCU sent, reassembled from its P-DATA-TF PDUs
    (PS3.8 §9.3.5: PDV items ``length, context id, header``; header bit 0 = command,
    bit 1 = last fragment): the bytes exactly as they went onto the socket."""
    data_sets: list[bytes] = []
    current = b""
    for pdu in sent_pdus:
        if pdu[0] != 0x04:  # not P-DATA-TF
            continue
        offset, end = 6, 6 + struct.unpack(">I", pdu[2:6])[0]
        while offset < end:
            length = struct.unpack(">I", pdu[offset:offset + 4])[0]
            header, fragment = pdu[offset + 5], pdu[offset + 6:offset + 4 + length]
            offset += 4 + length
            if header & 0x01:
                continue  # a command set fragment
            current += fragment
            if header & 0x02:
                data_sets.append(current)
                current = b""
    return data_sets


def _stored_data_set(path: Path) -> bytes:
    """The stored Part 10 file minus preamble, prefix and file meta group."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return path.read_bytes()[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def _instance_with_private_tags(syntax: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.ImageComments = COMMENT
    block = ds.private_block(0x0029, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", "vendor value")
    block.add_new(0x02, "OB", b"\x00\x01\x02\xfe")
    buffer = io.BytesIO()  # re-read, so that the data set's own encoding is ``syntax``
    ds.save_as(buffer, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True,
               enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def test_scp_stores_the_data_set_bytes_it_received(sqlite_backend: Backend,
                                                   tmp_path: Path) -> None:
    """Each stored file's data set equals, byte for byte, what the pynetdicom SCU put on the
    wire: private tags, ImageComments and element order untouched, in either transfer syntax
    (no decode, no re-encode)."""
    sent: list[bytes] = []
    datasets = [_instance_with_private_tags(s)
                for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)]
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log") as port:
        for ds in datasets:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(CT_IMAGE, [str(ds.file_meta.TransferSyntaxUID)])
            assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX",
                                 evt_handlers=[(evt.EVT_DATA_SENT,
                                                lambda event: sent.append(bytes(event.data)))])
            assert assoc.is_established
            try:
                assert assoc.send_c_store(ds).Status == 0x0000
            finally:
                assoc.release()
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        rows = wait_for(lambda: (r := _instances(sqlite_backend)).keys() >= set(uids) and r, 60,
                        what="instance rows")
    wire = _wire_data_sets(sent)
    assert len(wire) == 2
    for ds, on_wire in zip(datasets, wire, strict=True):
        stored_path = stored_file(sqlite_backend.settings,
                                  rows[str(ds.SOPInstanceUID)].stored_path or "")
        stored = pydicom.dcmread(stored_path)
        # Readable first (what a re-encoding would lose), then the exact bytes.
        assert stored.ImageComments == COMMENT
        for offset, value in ((0x01, b"vendor value"), (0x02, b"\x00\x01\x02\xfe")):
            element = stored.private_block(0x0029, PRIVATE_CREATOR)[offset]
            # UN in implicit VR (no private dictionary): compare the raw value either way.
            raw = element.value.encode() if isinstance(element.value, str) else element.value
            assert raw.rstrip(b" ") == value
        assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert len(on_wire) > 10_000  # the whole data set with its pixels, not a fragment
        assert _stored_data_set(stored_path) == on_wire


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _pki(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate, both CA-signed."""
    files = {name: tmp / f"{name}.pem" for name in
             ("ca", "ca_key", "server", "server_key", "client", "client_key")}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=lightbox test CA", "-keyout", str(files["ca_key"]), "-out", str(files["ca"]))
    for name, subject in (("server", "/CN=localhost"), ("client", "/CN=MODALITY")):
        csr = tmp / f"{name}.csr"
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout",
                 str(files[f"{name}_key"]), "-out", str(csr))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(files["ca"]), "-CAkey",
                 str(files["ca_key"]), "-CAcreateserial", "-days", "1", "-out", str(files[name]))
    return files


def _store_tls(port: int, ds: pydicom.Dataset, context: ssl.SSLContext) -> int | None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT_IMAGE)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX", tls_args=(context, "localhost"))
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


def test_tls_ca_requires_client_certificates(sqlite_backend: Backend, tmp_path: Path) -> None:
    """With ``LIGHTBOX_SCP_TLS_CA`` a client that presents no certificate gets no association
    (and stores nothing); the same client with a CA-signed certificate stores."""
    require("openssl")
    pki = _pki(tmp_path)
    refused, accepted = (_instance_with_private_tags(ExplicitVRLittleEndian) for _ in range(2))
    with lightbox_scp(sqlite_backend, tmp_path / "scp.log",
                      LIGHTBOX_SCP_TLS_CERT=str(pki["server"]),
                      LIGHTBOX_SCP_TLS_KEY=str(pki["server_key"]),
                      LIGHTBOX_SCP_TLS_CA=str(pki["ca"])) as port:
        anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        assert _store_tls(port, refused, anonymous) is None
        with_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        with_cert.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
        assert _store_tls(port, accepted, with_cert) == 0x0000
        wait_for(lambda: str(accepted.SOPInstanceUID) in _instances(sqlite_backend), 60,
                 what="the certified client's instance row")
    assert set(_instances(sqlite_backend)) == {str(accepted.SOPInstanceUID)}


def test_wire_reassembly_reads_pynetdicoms_encoding() -> None:
    """The helper above is itself right: a P-DATA-TF stream cut into fragments reassembles to
    the data set pynetdicom encoded (so a byte-for-byte failure is the SCP's, not the test's)."""
    from pynetdicom.dsutils import encode

    ds = _instance_with_private_tags(ExplicitVRLittleEndian)
    encoded = encode(ds, False, True)
    assert encoded is not None
    fragments = [encoded[i:i + 4000] for i in range(0, len(encoded), 4000)]
    pdus = []
    for i, fragment in enumerate(fragments):
        header = 0x02 if i == len(fragments) - 1 else 0x00
        item = struct.pack(">IBB", len(fragment) + 2, 1, header) + fragment
        pdus.append(struct.pack(">BBI", 0x04, 0, len(item)) + item)
    command = struct.pack(">IBB", 4, 1, 0x03) + b"\x00\x00"
    pdus.insert(0, struct.pack(">BBI", 0x04, 0, len(command)) + command)
    assert _wire_data_sets(pdus) == [encoded]
