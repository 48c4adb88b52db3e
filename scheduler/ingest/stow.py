"""DICOMweb STOW-RS: ``multipart/related; type="application/dicom"`` bodies → registration.

Each part goes through :func:`scheduler.ingest.registration.register_bytes` (the folder-ingest path) with
``source = "stow"``; the response is the standard DICOM JSON store response with a result per
instance: ReferencedSOPSequence for stored ones, FailedSOPSequence with a FailureReason for the
others (0xC210 cannot understand: quarantined; 0xA700 out of resources: storage full; 0xC122
not DICOM: a part that is not ``application/dicom``). HTTP 200 when all were stored, 202 when
some were, 409 when none were (PS3.18 §10.5).

The body is streamed, one file per part, never held whole in memory; a body over
``LIGHTBOX_STOW_MAX_BODY_MB`` or with more than ``LIGHTBOX_STOW_MAX_PARTS`` parts is refused as
a whole with HTTP 413 (no part stored, none quarantined).
"""

from __future__ import annotations

import email.message
import email.policy
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.parser import BytesParser
from pathlib import Path
from typing import Any, BinaryIO

import pydicom

from lightbox import metrics
from lightbox.errors import StorageFullError, StowRequestError
from lightbox.limits import check_deflated
from lightbox.settings import Settings
from scheduler.ingest.registration import Outcome, register_staged

log = logging.getLogger(__name__)

CANNOT_UNDERSTAND = 0xC210
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_NOT_SUPPORTED = 0xC122
STOW_OUTCOMES = {None: "stored", SOP_CLASS_NOT_SUPPORTED: "unsupported",
                 OUT_OF_RESOURCES: "refused", CANNOT_UNDERSTAND: "quarantined"}
MAX_PART_HEADER = 16 * 1024
# RFC 2046 says 70 characters; Orthanc's STOW client sends 73. Any bound will do.
MAX_BOUNDARY = 256


@dataclass(frozen=True)
class PartResult:
    sop_class_uid: str
    sop_instance_uid: str
    failure: int | None = None


class StowTooLarge(StowRequestError):
    """The request is over a limit (body size, number of parts): HTTP 413, nothing stored."""


@dataclass
class StagedPart:
    content_type: str
    path: Path
    size: int = 0


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/related`` content type (:class:`StowRequestError` if
    it is not one)."""
    kind, params = _content_type(content_type)
    if kind != "multipart/related":
        raise StowRequestError("expected multipart/related")
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise StowRequestError("multipart/related without a valid boundary")
    return boundary.encode("ascii", "replace")


def _content_type(value: str) -> tuple[str, dict[str, str]]:
    message = email.message.Message()
    message["content-type"] = value
    params = {k.lower(): v for k, v in (message.get_params() or [])[1:]}
    return message.get_content_type(), params


class MultipartStager:
    """A ``multipart/related`` body fed chunk by chunk, each part streamed into its own file.

    Why: the whole body in memory, then parsed by :mod:`email` (which copies it several times
    over), took 3.6 GB of RSS for one 300 MB part. Here memory is one chunk plus a part's
    headers, whatever the body; the limits on body size and number of parts raise
    :class:`StowTooLarge` as soon as they are passed, before the rest is read."""

    def __init__(self, boundary: bytes, directory: Path, *, max_bytes: int,
                 max_parts: int) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.directory, self.max_bytes, self.max_parts = directory, max_bytes, max_parts
        self.parts: list[StagedPart] = []
        self._buffer = b"\r\n"  # so that the first delimiter looks like every other one
        self._state = "preamble"  # preamble → after delimiter → headers → body → ... → end
        self._file: BinaryIO | None = None
        self._received = 0

    def feed(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received > self.max_bytes:
            raise StowTooLarge(f"request body over {self.max_bytes // 2**20} MiB "
                               "(LIGHTBOX_STOW_MAX_BODY_MB)")
        self._buffer += chunk
        while self._step():
            pass

    def close(self) -> list[StagedPart]:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._state != "end":
            raise StowRequestError("multipart body ends before its closing boundary")
        if not self.parts:
            raise StowRequestError("no parts in the multipart body")
        return self.parts

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for part in self.parts:
            part.path.unlink(missing_ok=True)

    def _step(self) -> bool:
        """Consume what the buffer allows; whether to try again."""
        if self._state in ("preamble", "body"):
            found = self._buffer.find(self.delimiter)
            keep = len(self.delimiter) - 1
            if found < 0:
                if len(self._buffer) > keep:
                    self._write(self._buffer[:-keep])
                    self._buffer = self._buffer[-keep:]
                return False
            self._write(self._buffer[:found])
            self._buffer = self._buffer[found + len(self.delimiter):]
            if self._file is not None:
                self._file.close()
                self._file = None
            self._state = "delimiter"
            return True
        if self._state == "delimiter":
            line_end = self._buffer.find(b"\r\n")
            if self._buffer.startswith(b"--"):
                self._state, self._buffer = "end", b""
                return False
            if line_end < 0:
                if len(self._buffer) > 1024:
                    raise StowRequestError("malformed multipart boundary line")
                return False
            if self._buffer[:line_end].strip(b" \t"):
                raise StowRequestError("malformed multipart boundary line")
            self._buffer = self._buffer[line_end + 2:]
            self._state = "headers"
            return True
        if self._state == "headers":
            end = self._buffer.find(b"\r\n\r\n")
            if self._buffer.startswith(b"\r\n"):
                end, skip = 0, 2
            else:
                skip = 4
            if end < 0:
                if len(self._buffer) > MAX_PART_HEADER:
                    raise StowRequestError("multipart part headers too long")
                return False
            self._start_part(self._buffer[:end])
            self._buffer = self._buffer[end + skip:]
            self._state = "body"
            return True
        self._buffer = b""  # end: the epilogue is ignored
        return False

    def _start_part(self, raw_headers: bytes) -> None:
        if len(self.parts) >= self.max_parts:
            raise StowTooLarge(f"more than {self.max_parts} parts in one request "
                               "(LIGHTBOX_STOW_MAX_PARTS)")
        headers = BytesParser(policy=email.policy.HTTP).parsebytes(raw_headers + b"\r\n\r\n")
        fd, name = tempfile.mkstemp(dir=self.directory, prefix="stow-", suffix=".part")
        self._file = os.fdopen(fd, "wb")
        self.parts.append(StagedPart(headers.get_content_type(), Path(name)))

    def _write(self, data: bytes) -> None:
        if self._state == "body" and self._file is not None and data:
            self._file.write(data)
            self.parts[-1].size += len(data)


async def stage_request(settings: Settings, content_type: str, content_length: str | None,
                        chunks: AsyncIterator[bytes]) -> list[StagedPart]:
    """Stream a STOW-RS body into one file per part under ``incoming/``; over a limit
    (:class:`StowTooLarge`) or malformed (:class:`StowRequestError`) nothing is kept."""
    try:
        boundary = boundary_of(content_type)
    except StowRequestError as exc:
        log.warning("STOW-RS request refused: %s (%s)", exc, content_type[:200])
        raise
    max_bytes = int(settings.stow_max_body_mb * 2**20)
    if content_length is not None and content_length.isdigit() and \
            int(content_length) > max_bytes:
        raise StowTooLarge(f"request body over {max_bytes // 2**20} MiB "
                           "(LIGHTBOX_STOW_MAX_BODY_MB)")
    directory = settings.data_path / "incoming"
    directory.mkdir(parents=True, exist_ok=True)
    stager = MultipartStager(boundary, directory, max_bytes=max_bytes,
                             max_parts=settings.stow_max_parts)
    try:
        async for chunk in chunks:
            stager.feed(chunk)
        return stager.close()
    except StowRequestError as exc:
        log.warning("STOW-RS request refused: %s", exc)
        stager.discard()
        raise
    except BaseException:
        stager.discard()
        raise


def _uids(path: Path, max_inflated_bytes: int) -> tuple[str, str]:
    try:
        check_deflated(path, max_inflated_bytes)  # pydicom inflates before reading any tag
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - unreadable parts are reported, never raised
        return "", ""


def store_part(settings: Settings, part: StagedPart) -> PartResult:
    """Register one staged part (its file is moved into storage or removed)."""
    result = _store_part(settings, part)
    metrics.STOW.labels(STOW_OUTCOMES.get(result.failure, "failed")).inc()
    return result


def _store_part(settings: Settings, part: StagedPart) -> PartResult:
    try:
        sop_class, sop_uid = _uids(part.path, int(settings.max_inflated_mb * 2**20))
        if part.content_type != "application/dicom":
            return PartResult(sop_class, sop_uid, SOP_CLASS_NOT_SUPPORTED)
        try:
            result = register_staged(settings, part.path, source="stow",
                                     min_free_mb=settings.scp_min_free_mb)
        except StorageFullError as exc:
            log.error("STOW-RS instance %s refused: %s", sop_uid or "?", exc)
            return PartResult(sop_class, sop_uid, OUT_OF_RESOURCES)
        if result.outcome == Outcome.quarantined:
            return PartResult(sop_class, sop_uid, CANNOT_UNDERSTAND)
        return PartResult(sop_class, result.sop_instance_uid or sop_uid)
    finally:
        part.path.unlink(missing_ok=True)


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


def store_parts(settings: Settings, parts: list[StagedPart]) -> list[PartResult]:
    """Register every staged part, in order (a part's file is gone afterwards)."""
    try:
        return [store_part(settings, part) for part in parts]
    finally:
        for part in parts:
            part.path.unlink(missing_ok=True)
