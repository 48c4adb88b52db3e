"""Storage SCP (`lightbox scp`): modalities and PACS push studies to Lightbox by C-STORE.

Every storage SOP class is accepted in every transfer syntax pynetdicom knows (uncompressed,
deflate, JPEG, JPEG-LS, JPEG 2000, RLE, ...), plus C-ECHO. Received bytes are kept exactly as
received (``event.encoded_dataset()``, no decode, no re-encode). Per C-STORE the handler checks
the header (the checks of :func:`scheduler.ingest.header.read_header`, so the status is right), writes
the bytes once into the durable spool (:mod:`scheduler.ingest.spool`, one flush) and answers; the
spool's registrar then registers batches in one transaction each (the batched form of the
folder-ingest path). Statuses:

* ``0x0000`` the bytes are on disk and will be registered (also after a crash: the spool is
  registered when the SCP starts again),
* ``0xA700`` out of resources: storage full or below ``LIGHTBOX_SCP_MIN_FREE_MB``; nothing kept,
* ``0xC210`` cannot understand: the instance failed the header checks (it is quarantined).

Callers not listed in ``LIGHTBOX_SCP_ALLOWED_CALLERS`` are rejected at association (calling AE
title not recognised), before any data is sent. Each association runs in its own thread.
What a peer can make the SCP hold before that check is bounded (:mod:`scheduler.ingest.scp_guard`:
PDU length, connections per host, time to send the A-ASSOCIATE-RQ).
"""

from __future__ import annotations

import functools
import logging
import ssl
import threading
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationServer
from sqlalchemy.exc import OperationalError

from db.models import Event
from db.session import session_scope
from lightbox import metrics
from lightbox.errors import ConfigurationError, IngestError, StorageFullError
from lightbox.settings import Settings
from scheduler.ingest.header import is_plain_uid
from scheduler.ingest.registration import Received, register_file
from scheduler.ingest.scp_guard import PduLimits, start_guarded_server
from scheduler.ingest.scp_replies import quiet_standard_handlers, use_cached_replies
from scheduler.ingest.spool import Spool, SpoolRegistrar, received, recover, spool_dir
from scheduler.ingest.uid_template import splice, split_around_placeholder

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
PRIORITY_HIGH = 0x0001  # C-STORE Priority: 0 medium, 1 high, 2 low
# Never an allowed title (a space inside): see handle_requested.
REJECTED_TITLE = "NOT ALLOWED"
PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass(frozen=True)
class Caller:
    """One allowed caller: an AE title, optionally pinned to a host address."""

    ae_title: str
    host: str | None = None


def parse_callers(spec: str) -> list[Caller] | None:
    """``"MODALITY1, PACS@10.0.0.5"`` → callers; ``"*"`` → None (any caller)."""
    callers = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item == "*":
            return None
        title, _, host = item.partition("@")
        if not title.strip() or len(title.strip()) > 16:
            raise ConfigurationError(f"invalid allowed caller {item!r} (AE title of 1-16 chars)")
        callers.append(Caller(title.strip(), host.strip() or None))
    if not callers:
        raise ConfigurationError(
            "no allowed callers: set LIGHTBOX_SCP_ALLOWED_CALLERS to the AE titles that may "
            "send (e.g. 'PACS,CT1@10.0.0.7'), or '*' to accept any caller")
    return callers


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Server-side TLS from the cert/key settings (client certs required when a CA is set)."""
    if settings.scp_tls_cert is None:
        return None
    if settings.scp_tls_key is None:
        raise ConfigurationError("LIGHTBOX_SCP_TLS_CERT needs LIGHTBOX_SCP_TLS_KEY")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(settings.scp_tls_cert), str(settings.scp_tls_key))
    if settings.scp_tls_ca is not None:
        context.load_verify_locations(str(settings.scp_tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def handle_requested(event: evt.Event, callers: list[Caller] | None) -> None:
    """Reject callers whose AE title, or pinned host, is not allowed."""
    if callers is None:
        return
    requestor = event.assoc.requestor
    # EVT_REQUESTED fires before negotiation: the title is still only in the A-ASSOCIATE-RQ.
    title = str(requestor.primitive.calling_ae_title).strip()  # type: ignore[union-attr]
    if all(c.ae_title != title for c in callers):
        return  # pynetdicom's require_calling_aet rejects it during negotiation
    if any(c.ae_title == title and (c.host is None or c.host == requestor.address)
           for c in callers):
        return
    log.warning("rejected association from %s at %s (not an allowed caller)",
                title, requestor.address)
    # Rejecting here with acse.send_reject races the socket shutdown (the peer sees an abort).
    # Renaming the caller in the request makes pynetdicom's own require_calling_aet check send
    # a proper A-ASSOCIATE-RJ (permanent, calling AE title not recognised) during negotiation.
    requestor.primitive.calling_ae_title = REJECTED_TITLE  # type: ignore[union-attr]


def part10(meta: FileMetaDataset, dataset: bytes, calling: str, called: str) -> bytes:
    """The received data set as a Part 10 byte stream, as received (no decode, no re-encode).

    The file meta records who sent it (Sending/Receiving AE Title, PS3.10), so that a spool
    file recovered after a crash is registered with its ``scp:<AE>`` source."""
    meta.SendingApplicationEntityTitle = calling
    meta.ReceivingApplicationEntityTitle = called
    return b"".join((PREAMBLE, encode_file_meta(meta), dataset))


def part10_prefix(sop_class: str, sop_instance: str, syntax: str, calling: str,
                  called: str) -> bytes:
    """Preamble and file meta for one received instance: what :func:`part10` puts before the
    data set for ``event.file_meta`` (pynetdicom's meta) with these values, byte for byte.

    Why: pydicom's encoding of the nine meta elements is a sizeable share of what one C-STORE
    costs the SCP, and a sender waits for every reply. Within one association only the
    instance UID changes, so the encoding is made once per (SOP class, transfer syntax, AE
    titles, UID length) around a placeholder of the UID's length, by pydicom, and the UID
    goes in its place (same length, so same element length, group length and padding).
    A UID that is not a plain DICOM UID is encoded the slow way (and refused later)."""
    template = (_meta_template(sop_class, syntax, len(sop_instance), calling, called)
                if is_plain_uid(sop_instance) else None)
    if template is None:
        return _encoded_meta(sop_class, sop_instance, syntax, calling, called)
    return splice(template, sop_instance)


def _encoded_meta(sop_class: str, sop_instance: str, syntax: str, calling: str,
                  called: str) -> bytes:
    meta = create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
                            transfer_syntax=UID(syntax))
    return part10(meta, b"", calling, called)


@functools.lru_cache(maxsize=256)
def _meta_template(sop_class: str, syntax: str, uid_length: int, calling: str,
                   called: str) -> tuple[bytes, bytes] | None:
    return split_around_placeholder(
        lambda uid: _encoded_meta(sop_class, uid, syntax, calling, called), uid_length)


def handle_store(event: evt.Event, settings: Settings, spool: Spool,
                 registrar: SpoolRegistrar, counts: dict[str, int],
                 lock: threading.Lock) -> int:
    """Write the bytes as received into the spool and start their flush, check the header
    meanwhile, answer once they are durable; registration follows in
    :class:`~scheduler.ingest.spool.SpoolRegistrar` (rows come in batches, after the reply)."""
    calling = event.assoc.requestor.ae_title.strip()
    source = f"scp:{calling}"[:32]
    try:
        try:
            request = event.request
            data = part10_prefix(str(request.AffectedSOPClassUID),
                                 str(request.AffectedSOPInstanceUID),  # type: ignore[union-attr]
                                 str(event.context.transfer_syntax), calling,
                                 settings.scp_ae_title) + event.encoded_dataset(
                include_meta=False)
        except Exception as exc:  # noqa: BLE001 - any unparseable request: "cannot understand"
            log.warning("C-STORE from %s: undecodable data set (%s)", calling,
                        type(exc).__name__)
            return _count(counts, lock, "quarantined", CANNOT_UNDERSTAND)
        flushing = spool.write(data, min_free_mb=settings.scp_min_free_mb)
        try:  # checked in memory while the bytes are being flushed
            item: Received | None = received(
                flushing.slot, data, source,
                max_inflated_bytes=int(settings.max_inflated_mb * 2**20))
        except IngestError:
            item = None
        slot = flushing.wait()
    except StorageFullError as exc:
        log.error("C-STORE from %s refused: %s", calling, exc)
        return _count(counts, lock, "out_of_resources", OUT_OF_RESOURCES)
    if item is None:
        # Same checks and quarantine as every other input: register_file quarantines it.
        try:
            result = register_file(settings, slot, source=source, move=True)
        except OperationalError as exc:  # kept in the spool: quarantined at the next start
            log.error("C-STORE from %s refused: database unavailable (%s)", calling,
                      type(exc.orig).__name__)
            return _count(counts, lock, "database_unavailable", OUT_OF_RESOURCES)
        log.warning("C-STORE from %s quarantined: %s", calling, result.reason)
        return _count(counts, lock, "quarantined", CANNOT_UNDERSTAND)
    registrar.submit(item)
    if getattr(event.request, "Priority", 0) == PRIORITY_HIGH:
        _record_high_priority(settings, calling, item.header.study_instance_uid,
                              item.header.sop_instance_uid)
    metrics.CSTORE.labels("success").inc()
    return SUCCESS


def _count(counts: dict[str, int], lock: threading.Lock, key: str, status: int) -> int:
    metrics.CSTORE.labels(key).inc()
    with lock:
        counts[key] = counts.get(key, 0) + 1
    return status


def _record_high_priority(settings: Settings, calling: str, study_uid: str | None,
                          sop_uid: str | None) -> None:
    """C-STORE Priority HIGH is kept as an event (``cstore_high_priority``) for the STAT
    rules to read; the instance row itself only carries ``source = scp:<AE>``."""
    try:
        with session_scope(settings.sqlalchemy_url) as session:
            session.add(Event(kind="cstore_high_priority", study_instance_uid=study_uid,
                              detail={"sop_instance_uid": sop_uid,
                                      "calling_ae_title": calling}))
    except OperationalError as exc:  # the instance itself is safe in the spool
        log.error("priority of %s not recorded: database unavailable (%s)", sop_uid,
                  type(exc.orig).__name__)


def handle_echo(event: evt.Event) -> int:
    return SUCCESS


def make_ae(settings: Settings) -> AE:
    """The SCP's application entity: all storage SOP classes × all transfer syntaxes."""
    ae = AE(ae_title=settings.scp_ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    ae.maximum_associations = settings.scp_max_associations
    # Large, so senders that honour it send fewer P-DATA PDUs; bounded, because a PDU is read
    # whole into memory (scheduler.ingest.scp_guard refuses longer ones).
    ae.maximum_pdu_size = settings.scp_max_pdu_kb * 1024
    # The ARTIM timer: how long a connection may wait before its A-ASSOCIATE-RQ.
    ae.acse_timeout = settings.scp_association_timeout
    callers = parse_callers(settings.scp_allowed_callers)
    if callers is not None:
        # pynetdicom's own check (AE title) runs first; the handler adds the host pinning.
        ae.require_calling_aet = sorted({c.ae_title for c in callers})
    return ae


class Scp:
    """A running SCP: the association server and the registrar draining its spool."""

    def __init__(self, server: AssociationServer, registrar: SpoolRegistrar) -> None:
        self.server, self.registrar = server, registrar

    def shutdown(self) -> None:
        """Stop accepting, then register everything already acknowledged."""
        try:
            self.server.shutdown()
        finally:
            self.registrar.stop()


def start_scp(settings: Settings, *, counts: dict[str, int] | None = None) -> Scp:
    """Register what a crash left in the spool, then listen on
    ``LIGHTBOX_SCP_BIND_ADDRESS:LIGHTBOX_SCP_PORT`` (returns at once: call ``shutdown()``)."""
    ae = make_ae(settings)
    callers = parse_callers(settings.scp_allowed_callers)
    counts = counts if counts is not None else {}
    lock = threading.Lock()
    spool = Spool(spool_dir(settings))
    recover(settings, spool)
    registrar = SpoolRegistrar(settings, spool, counts, lock)
    registrar.start()
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [settings, spool, registrar, counts, lock]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_REQUESTED, handle_requested, [callers]),
    ]
    if quiet_standard_handlers(settings.log_level):  # at DEBUG, pynetdicom logs every reply
        handlers.append((evt.EVT_ESTABLISHED, use_cached_replies))
    address = (settings.scp_bind_address, settings.scp_port)
    context = tls_context(settings)
    log.info("storage SCP %s listening on %s:%d%s (callers: %s)", settings.scp_ae_title,
             *address, " with TLS" if context else "", settings.scp_allowed_callers)
    server = start_guarded_server(ae, address, limits(settings), evt_handlers=handlers,
                                  ssl_context=context)
    return Scp(server, registrar)


def limits(settings: Settings) -> PduLimits:
    return PduLimits(associate=settings.scp_max_associate_kb * 1024,
                     data=settings.scp_max_pdu_kb * 1024,
                     per_host=settings.scp_max_connections_per_host,
                     handshake_seconds=settings.scp_association_timeout)


def run_scp(settings: Settings, stop: threading.Event) -> dict[str, int]:
    """Serve until ``stop`` is set; return counts by outcome."""
    counts: dict[str, int] = {}
    scp = start_scp(settings, counts=counts)
    listening = metrics.ready_flag("listening")
    listening.set()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        listening.clear()
        scp.shutdown()
    return counts
