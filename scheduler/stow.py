"""DICOMweb STOW-RS: ``multipart/related; type="application/dicom"`` bodies → registration.

Each part goes through :func:`scheduler.register.register_bytes` (the folder-ingest path) with
``source = "stow"``; the response is the standard DICOM JSON store response with a result per
instance: ReferencedSOPSequence for stored ones, FailedSOPSequence with a FailureReason for the
others (0xC210 cannot understand: quarantined; 0xA700 out of resources: storage full; 0xC122
not DICOM: a part that is not ``application/dicom``). HTTP 200 when all were stored, 202 when
some were, 409 when none were (PS3.18 §10.5).
"""

from __future__ import annotations

import email.policy
import io
import logging
from dataclasses import dataclass
from email.parser import BytesParser
from typing import Any

import pydicom

from lightbox.errors import StorageFullError, StowRequestError
from lightbox.settings import Settings
from scheduler.register import Outcome, register_bytes

log = logging.getLogger(__name__)

CANNOT_UNDERSTAND = 0xC210
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_NOT_SUPPORTED = 0xC122


@dataclass(frozen=True)
class PartResult:
    sop_class_uid: str
    sop_instance_uid: str
    failure: int | None = None


def split_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(content type, bytes) of each part of a multipart/related body."""
    if not content_type.lower().startswith("multipart/related"):
        raise StowRequestError("expected multipart/related")
    if "boundary=" not in content_type:
        raise StowRequestError("multipart/related without a boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise StowRequestError("body is not multipart")
    parts: list[tuple[str, bytes]] = []
    for part in message.iter_parts():  # type: ignore[attr-defined,unused-ignore]
        payload = part.get_payload(decode=True) or b""
        parts.append((part.get_content_type(), bytes(payload)))
    return parts


def _uids(data: bytes) -> tuple[str, str]:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - unreadable parts are reported, never raised
        return "", ""


def store_part(settings: Settings, content_type: str, data: bytes) -> PartResult:
    sop_class, sop_uid = _uids(data)
    if content_type != "application/dicom":
        return PartResult(sop_class, sop_uid, SOP_CLASS_NOT_SUPPORTED)
    try:
        result = register_bytes(settings, data, source="stow",
                                min_free_mb=settings.scp_min_free_mb)
    except StorageFullError as exc:
        log.error("STOW-RS instance %s refused: %s", sop_uid or "?", exc)
        return PartResult(sop_class, sop_uid, OUT_OF_RESOURCES)
    if result.outcome == Outcome.quarantined:
        return PartResult(sop_class, sop_uid, CANNOT_UNDERSTAND)
    return PartResult(sop_class, result.sop_instance_uid or sop_uid)


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def response_body(results: list[PartResult], base_url: str) -> tuple[int, dict[str, Any]]:
    """HTTP status and DICOM JSON store response for the per-part results."""
    stored = [r for r in results if r.failure is None]
    failed = [r for r in results if r.failure is not None]
    body: dict[str, Any] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [
            {"00081150": _ui(r.sop_class_uid), "00081155": _ui(r.sop_instance_uid),
             "00081190": {"vr": "UR", "Value": [f"{base_url}/instances/{r.sop_instance_uid}"]}}
            for r in stored]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {"00081150": _ui(r.sop_class_uid), "00081155": _ui(r.sop_instance_uid),
             "00081197": {"vr": "US", "Value": [r.failure]}} for r in failed]}
    status = 200 if not failed else (202 if stored else 409)
    return status, body


def stow(settings: Settings, content_type: str, body: bytes) -> list[PartResult]:
    """Register every part; raises :class:`StowRequestError` for a malformed request."""
    parts = split_parts(content_type, body)
    if not parts:
        raise StowRequestError("no parts in the multipart body")
    return [store_part(settings, kind, data) for kind, data in parts]
