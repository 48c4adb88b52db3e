"""Bounds on what an unauthenticated peer can make the SCP hold: PDU length, connections per
host, time before the A-ASSOCIATE-RQ.

Why: pynetdicom reads a whole PDU into memory, of whatever length its 6-byte header declares
(up to 4 GiB), before any AE title check; idle TCP connections count as associations until
the ARTIM timer closes them. Here:

* :class:`BoundedDUL` reads the header first and refuses a PDU longer than its limit (the
  A-ASSOCIATE-RQ limit before association, the announced maximum PDU length for P-DATA) with
  an A-ABORT, through pynetdicom's own state machine (an invalid PDU, Evt19), then closes the
  connection without reading the rest;
* :class:`GuardedServer` closes, with an A-ABORT, a connection from a host that already holds
  ``max_per_host`` connections, in the accept loop, so one host cannot take every slot;
* the ARTIM timer (``AE.acse_timeout``) closes a connection that sends no A-ASSOCIATE-RQ, and
  a TLS handshake must end within the same time (it runs in the accept loop).

These use pynetdicom internals (``DULServiceProvider._read_pdu_data``, ``RequestHandler.
_create_association``, ``AssociationServer.get_request``, ``AE.make_server``/``_servers``): pyproject pins pynetdicom's major
version and ``tests/test_limits.py::test_pynetdicom_internals_are_there`` fails loudly
if they change.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
# A-RELEASE-RQ/RP and A-ABORT are 4 bytes long; anything else an acceptor gets is refused.
SMALL_PDU = 64
ABORT_GRACE_SECONDS = 1.0
DISCARD_CHUNK = 64 * 1024


@dataclass(frozen=True)
class PduLimits:
    """Longest PDU (its variable part, the header's length field) accepted, by type."""

    associate: int
    data: int
    per_host: int
    handshake_seconds: float | None = None  # TLS handshake, in the accept loop

    def limit(self, pdu_type: int) -> int:
        if pdu_type == A_ASSOCIATE_RQ:
            return self.associate
        if pdu_type == P_DATA_TF:
            return self.data + SMALL_PDU  # the announced maximum plus PDV item headers
        return SMALL_PDU


class PushbackSocket(AssociationSocket):
    """An :class:`AssociationSocket` whose reader can give back bytes it has read."""

    _unread: bytes = b""

    def unread(self, data: bytes) -> None:
        self._unread = bytes(data) + self._unread

    def recv(self, nr_bytes: int) -> bytearray:
        if not self._unread:
            return super().recv(nr_bytes)
        head, self._unread = self._unread[:nr_bytes], self._unread[nr_bytes:]
        data = bytearray(head)
        if len(data) < nr_bytes:
            data += super().recv(nr_bytes - len(data))
        return data


class BoundedDUL(DULServiceProvider):
    """pynetdicom's DUL, reading a PDU only when its declared length is within the limit."""

    limits: PduLimits | None = None
    _refused = False
    _refused_at = 0.0

    def _read_pdu_data(self) -> None:
        sock = self.socket
        if self._refused:
            # The A-ABORT is out. Discard what follows for a moment (closing a socket with
            # unread data resets the connection, and the peer may lose the A-ABORT), then
            # close rather than read the rest.
            if sock is not None and sock.socket is not None \
                    and time.monotonic() - self._refused_at < ABORT_GRACE_SECONDS:
                try:
                    sock.socket.recv(DISCARD_CHUNK)
                    return
                except OSError:
                    pass
            if sock is not None:
                sock.close()
            return
        if self.limits is None or not isinstance(sock, PushbackSocket):
            super()._read_pdu_data()
            return
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")  # transport connection closed
            return
        if len(header) == 6:
            pdu_type, _, length = struct.unpack(">BBL", header)
            if length > self.limits.limit(pdu_type):
                log.warning("aborted association from %s: PDU type 0x%02X declares %d bytes "
                            "(limit %d)", self.assoc.requestor.address, pdu_type, length,
                            self.limits.limit(pdu_type))
                self._refused, self._refused_at = True, time.monotonic()
                self.event_queue.put("Evt19")  # invalid PDU: the state machine sends A-ABORT
                return
        sock.unread(bytes(header))
        super()._read_pdu_data()


class GuardedHandler(RequestHandler):
    """pynetdicom's request handler with a bounded DUL and socket for each association."""

    server: GuardedServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # Same objects, the subclasses only add the bounds (no state of their own to set up).
        assoc.dul.__class__ = BoundedDUL
        assoc.dul.limits = self.server.limits  # type: ignore[attr-defined]
        assert assoc.dul.socket is not None
        assoc.dul.socket.__class__ = PushbackSocket
        return assoc


def _abort_bytes() -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = 0x02  # service provider
    pdu.reason_diagnostic = 0x00
    return bytes(pdu.encode())


class GuardedServer(AssociationServer):
    """An association server that refuses a host's connections beyond ``limits.per_host``.

    Not threaded per request on purpose: creating an association only starts its thread, so
    doing it in the accept loop keeps the per-host count exact for the next connection."""

    limits: PduLimits

    def get_request(self) -> tuple[Any, Any]:
        """Accept, and with TLS shake hands within ``limits.handshake_seconds``: pynetdicom
        does the handshake in the accept loop without a timeout, so one connection that never
        starts it would stop the SCP accepting anyone (a timeout is an ``OSError``, which
        socketserver drops the connection for)."""
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client.settimeout(self.limits.handshake_seconds)
            try:
                client = self.ssl_context.wrap_socket(client, server_side=True)
            except OSError:
                client.close()
                raise
            client.settimeout(None)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = client_address[0]
        held = sum(1 for assoc in self.active_associations if assoc.requestor.address == host)
        if held < self.limits.per_host:
            return True
        log.warning("refused a connection from %s: it holds %d (limit per host)", host, held)
        try:
            request.settimeout(1.0)
            request.sendall(_abort_bytes())
        except OSError:
            pass
        return False  # socketserver closes it


def start_guarded_server(ae: AE, address: tuple[str, int], limits: PduLimits,
                         **kwargs: Any) -> GuardedServer:
    """``ae.start_server(address, block=False, **kwargs)`` with the bounds above."""
    server = cast(GuardedServer, ae.make_server(
        address, server_class=GuardedServer,  # type: ignore[type-var]
        request_handler=GuardedHandler, **kwargs))
    server.limits = limits
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer@lightbox",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # type: ignore[arg-type]  # what AE.shutdown() stops
    return server
