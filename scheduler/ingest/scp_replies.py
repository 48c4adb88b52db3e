"""C-STORE responses encoded from cached templates, for the storage SCP's associations.

Why: a sender such as ``storescu`` waits for each reply before it sends the next instance, so
what the SCP spends per reply is spent per instance. pynetdicom builds every C-STORE-RSP
command set as a pydicom data set and encodes it (interpreter time per reply, a sizeable share
of an instance's whole cost). Within an association only the
message ID and the SOP instance UID change, so pynetdicom's own encoding is made once per
(SOP class, status, UID length) around placeholders and the two values go in their places
(:mod:`scheduler.ingest.uid_template`; the message ID is a fixed two-byte US value). Anything the template does not cover (a status comment, an
offending element, a UID that is not a plain DICOM UID, a peer PDU limit too small for one
fragment) goes pynetdicom's way.

The cached path is used only while pynetdicom's standard log handlers are off (see
:func:`quiet_standard_handlers`): it does not fire ``EVT_DIMSE_SENT``, which only they use.
"""

from __future__ import annotations

import functools
import logging
import struct
from typing import Any

from pynetdicom import _config, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from scheduler.ingest.header import is_plain_uid
from scheduler.ingest.uid_template import splice, split_around_placeholder

# (0000,0120) Message ID Being Responded To, Implicit VR Little Endian, value length 2.
MESSAGE_ID_ELEMENT = b"\x00\x00\x20\x01\x02\x00\x00\x00"
PLACEHOLDER_MESSAGE_ID = 0x5A5A
PDV_HEADER = 6  # item length (4), context ID (1), message control header (1)


def quiet_standard_handlers(log_level: str) -> bool:
    """Turn pynetdicom's per-PDU and per-message log handlers off unless Lightbox logs at
    DEBUG; returns whether they are off. Those handlers format every PDU and DIMSE message
    (INFO and DEBUG lines, one set per received instance) and are bound when an association
    server starts, so this must run before ``start_server``."""
    quiet = logging.getLevelName(log_level.upper()) != logging.DEBUG
    _config.LOG_HANDLER_LEVEL = "none" if quiet else "standard"
    return bool(quiet)


def store_response_pdv(primitive: Any) -> bytes | None:
    """The presentation data value (message control header and command set) that pynetdicom
    would send for this C-STORE response, or ``None`` where the template does not apply."""
    if (not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None
            or getattr(primitive, "_dataset_path", None) is not None
            or primitive.ErrorComment is not None or primitive.OffendingElement is not None):
        return None
    message_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
    sop_class, sop_instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    if not (isinstance(message_id, int) and isinstance(status, int)
            and isinstance(sop_class, str) and isinstance(sop_instance, str)):
        return None
    if not is_plain_uid(sop_instance):
        return None
    template = _template(str(sop_class), status, len(sop_instance))
    if template is None:
        return None
    head, tail, id_offset = template
    encoded = bytearray(splice((head, tail), sop_instance))
    struct.pack_into("<H", encoded, id_offset, message_id)
    return bytes(encoded)


@functools.lru_cache(maxsize=256)
def _template(sop_class: str, status: int, uid_length: int) -> tuple[bytes, bytes, int] | None:
    """pynetdicom's encoding around a placeholder UID and message ID: (bytes before the UID,
    bytes after it, message ID offset), or ``None`` if a placeholder cannot be found in
    exactly one place."""
    parts = split_around_placeholder(
        lambda uid: pynetdicom_response_pdv(PLACEHOLDER_MESSAGE_ID, sop_class, uid, status),
        uid_length)
    if parts is None:
        return None
    head, tail = parts
    # The tags are sorted, so (0000,0120) comes before the UID's (0000,1000).
    if head.count(MESSAGE_ID_ELEMENT) != 1 or MESSAGE_ID_ELEMENT in tail:
        return None
    return head, tail, head.index(MESSAGE_ID_ELEMENT) + len(MESSAGE_ID_ELEMENT)


def pynetdicom_response_pdv(message_id: int, sop_class: str, sop_instance: str,
                            status: int) -> bytes | None:
    """What pynetdicom itself encodes for this response, as one presentation data value."""
    rsp = C_STORE()
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = message_id  # as pynetdicom's SCP sets them
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    fragments = list(message.encode_msg(1, 0))
    if len(fragments) != 1 or len(fragments[0].presentation_data_value_list) != 1:
        return None
    return bytes(fragments[0].presentation_data_value_list[0][1])


class CachedStoreReplies:
    """Stands in for one association's ``dimse.send_msg``: C-STORE responses from the
    templates, every other message (and every response they do not cover) pynetdicom's way."""

    def __init__(self, dimse: Any) -> None:
        self._dimse = dimse
        self._send_msg = dimse.send_msg

    def __call__(self, primitive: Any, context_id: int) -> None:
        pdv = store_response_pdv(primitive)
        limit = self._dimse.maximum_pdu_size
        if pdv is None or (limit and len(pdv) - 1 + PDV_HEADER > limit):
            self._send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, pdv))
        self._dimse.dul.send_pdu(pdata)


def use_cached_replies(event: evt.Event) -> None:
    """``EVT_ESTABLISHED`` handler: this association's C-STORE replies come from templates."""
    dimse = event.assoc.dimse
    if not isinstance(dimse.send_msg, CachedStoreReplies):
        dimse.send_msg = CachedStoreReplies(dimse)  # type: ignore[method-assign]
