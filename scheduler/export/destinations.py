"""Export destinations and how to send to them: C-STORE to an AE, or STOW-RS to a URL.

Destinations come from ``LIGHTBOX_EXPORT_DESTINATIONS`` (JSON list). A sender returns one
:class:`SendResult` per object and sorts each failure into *transient* (worth retrying later:
connection refused or timed out, association rejected-transient, 0xA7xx out of resources,
HTTP 5xx/408/429) or *permanent* (retrying cannot help: association rejected-permanent, SOP
class or transfer syntax not accepted, 0xCxxx/0xA9xx and other failure statuses, HTTP 4xx).
The outbox (:mod:`scheduler.export.outbox`) turns that into backoff or a dead row.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE

from lightbox.errors import ConfigurationError
from lightbox.settings import Settings

log = logging.getLogger(__name__)

WARNING_STATUSES = {0xB000, 0xB006, 0xB007}
TAG_FAILED_SOP_SEQUENCE = "00081198"
TAG_FAILURE_REASON = "00081197"
TAG_REFERENCED_SOP_INSTANCE = "00081155"


@dataclass(frozen=True)
class SendResult:
    ok: bool
    transient: bool = False
    code: str = ""
    detail: str = ""


def ok() -> SendResult:
    return SendResult(True)


def transient(code: str, detail: str) -> SendResult:
    return SendResult(False, True, code, detail)


def permanent(code: str, detail: str) -> SendResult:
    return SendResult(False, False, code, detail)


def classify_status(status: int) -> SendResult:
    """A C-STORE (or STOW FailureReason) status → outcome."""
    if status == 0x0000 or status in WARNING_STATUSES:
        return ok()
    if 0xA700 <= status <= 0xA7FF:
        return transient(f"status_{status:04X}", "out of resources at the destination")
    return permanent(f"status_{status:04X}", "the destination refused the object")


@dataclass(frozen=True)
class DicomDestination:
    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str

    def send(self, paths: Sequence[Path], timeout: float) -> list[SendResult]:
        """One association for the whole batch; one result per path, in order."""
        datasets: list[Dataset | None] = []
        for path in paths:
            try:
                datasets.append(pydicom.dcmread(path))
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                log.error("export object %s unreadable: %s", path.name, exc)
                datasets.append(None)
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                    for ds in datasets if ds is not None}
        for sop_class, syntax in sorted(contexts):
            ae.add_requested_context(sop_class, [syntax])
        if not contexts:
            return [permanent("unreadable", "export object unreadable") for _ in paths]
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            failure = self._association_failure(assoc)
            return [failure for _ in paths]
        results: list[SendResult] = []
        try:
            for ds in datasets:
                if ds is None:
                    results.append(permanent("unreadable", "export object unreadable"))
                    continue
                if not assoc.is_established:
                    results.append(transient("association_lost", "association ended early"))
                    continue
                try:
                    response = assoc.send_c_store(ds)
                except ValueError as exc:  # no accepted presentation context for this object
                    results.append(permanent("sop_class_not_supported", str(exc)[:200]))
                    continue
                if "Status" not in response:
                    results.append(transient("no_response", "no C-STORE response (timeout)"))
                    continue
                results.append(classify_status(int(response.Status)))
        finally:
            if assoc.is_established:
                assoc.release()
        return results

    def _association_failure(self, assoc: Any) -> SendResult:
        where = f"{self.ae_title}@{self.host}:{self.port}"
        if assoc.is_rejected:
            result = getattr(assoc.acceptor.primitive, "result", 0x01)
            if result == 0x02:
                return transient("association_rejected_transient",
                                 f"{where} rejected the association (transient)")
            return permanent("association_rejected", f"{where} rejected the association")
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            return permanent("sop_class_not_supported",
                             f"{where} accepted none of the SOP classes/transfer syntaxes")
        return transient("connection_failed", f"cannot reach {where}")


@dataclass(frozen=True)
class StowDestination:
    name: str
    url: str
    token: str | None = None

    def send(self, paths: Sequence[Path], timeout: float) -> list[SendResult]:
        """One STOW-RS request for the batch; per-object results from the response."""
        boundary = uuid.uuid4().hex
        parts, uids = [], []
        for path in paths:
            data = path.read_bytes()
            uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
            parts.append(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                         + data + b"\r\n")
        body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.url.rstrip("/") + "/studies"
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=timeout)
        except httpx.TransportError as exc:
            return [transient("connection_failed", f"{url}: {type(exc).__name__}")] * len(paths)
        code = response.status_code
        if code == 200:
            return [ok()] * len(paths)
        if code in (202, 409):
            return self._per_instance(response, uids)
        if code in (408, 429) or code >= 500:
            return [transient(f"http_{code}", f"{url} answered {code}")] * len(paths)
        return [permanent(f"http_{code}", f"{url} answered {code}")] * len(paths)

    @staticmethod
    def _per_instance(response: httpx.Response, uids: list[str]) -> list[SendResult]:
        failed: dict[str, int] = {}
        try:
            body = response.json()
            items = body.get(TAG_FAILED_SOP_SEQUENCE, {}).get("Value", []) if isinstance(
                body, dict) else []
            for item in items:
                uid = item[TAG_REFERENCED_SOP_INSTANCE]["Value"][0]
                failed[uid] = int(item.get(TAG_FAILURE_REASON, {}).get("Value", [0x0110])[0])
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return [permanent(f"http_{response.status_code}", "unparseable STOW response")
                    ] * len(uids)
        return [classify_status(failed[uid]) if uid in failed else ok() for uid in uids]


Destination = DicomDestination | StowDestination


def load_destinations(settings: Settings) -> dict[str, Destination]:
    """Destinations by name, validated (a bad entry stops the exporter with a clear error)."""
    destinations: dict[str, Destination] = {}
    for raw in settings.export_destinations:
        try:
            name, kind = str(raw["name"]), str(raw.get("type", "dicom"))
            if kind == "dicom":
                destinations[name] = DicomDestination(
                    name=name, ae_title=str(raw["ae_title"]), host=str(raw["host"]),
                    port=int(raw["port"]),
                    calling_ae_title=str(raw.get("calling_ae_title", settings.scp_ae_title)))
            elif kind == "stow":
                destinations[name] = StowDestination(name=name, url=str(raw["url"]),
                                                     token=raw.get("token"))
            else:
                raise ConfigurationError(f"destination {name}: unknown type {kind!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"invalid export destination {raw.get('name', '?')!r}: {exc}") from exc
    return destinations
