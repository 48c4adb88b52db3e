"""Backfill from PACS (`lightbox pull`): C-FIND studies by date range and modality, then
retrieve them.

* **C-MOVE** (default): the PACS sends the study to our Storage SCP (``LIGHTBOX_SCP_AE_TITLE``,
  which the PACS must know as a destination, and which must be running); instances are
  registered there, as any pushed instance.
* **C-GET**: instances come back on the same association and are registered here through the
  same :func:`scheduler.ingest.registration.register_bytes` path (``source = "pull:<PACS AE>"``).

The PACS is ``LIGHTBOX_PACS_AE_TITLE`` at ``LIGHTBOX_PACS_HOST:LIGHTBOX_PACS_PORT``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from lightbox.errors import PullError, StorageFullError
from lightbox.settings import Settings
from scheduler.ingest.registration import Outcome, register_bytes

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)
# Storage classes offered for C-GET (a requestor may propose at most 128 contexts).
GET_STORAGE_CONTEXTS = StoragePresentationContexts[:120]


@dataclass(frozen=True)
class StudyQuery:
    since: str | None = None  # YYYYMMDD
    until: str | None = None
    modalities: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()

    def date_range(self) -> str:
        if not self.since and not self.until:
            return ""
        return f"{self.since or ''}-{self.until or ''}"


@dataclass
class FoundStudy:
    study_instance_uid: str
    study_date: str = ""
    modalities: str = ""
    instances: int | None = None


@dataclass
class RetrieveReport:
    studies: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_studies: list[str] = field(default_factory=list)


def _ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.scp_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    return ae


def _associate(settings: Settings, ae: AE, **kwargs: Any) -> Any:
    assoc = ae.associate(settings.pacs_host, settings.pacs_port,
                         ae_title=settings.pacs_ae_title, **kwargs)
    if not assoc.is_established:
        what = "rejected the association" if assoc.is_rejected else "is not reachable"
        raise PullError(f"PACS {settings.pacs_ae_title}@{settings.pacs_host}:"
                        f"{settings.pacs_port} {what}")
    return assoc


def _find_identifier(query: StudyQuery, modality: str, study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = query.date_range()
    ds.ModalitiesInStudy = modality
    ds.NumberOfStudyRelatedInstances = ""
    return ds


def find_studies(settings: Settings, query: StudyQuery) -> list[FoundStudy]:
    """C-FIND at study level: one query per modality (multi-valued matching of
    ModalitiesInStudy is optional for a PACS), results merged by Study Instance UID."""
    ae = _ae(settings)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(settings, ae)
    found: dict[str, FoundStudy] = {}
    try:
        for modality in query.modalities or ("",):
            for study_uid in query.study_uids or ("",):
                identifier = _find_identifier(query, modality, study_uid)
                for status, match in assoc.send_c_find(
                        identifier, StudyRootQueryRetrieveInformationModelFind):
                    code = int(status.Status) if "Status" in status else None
                    if code is None:
                        raise PullError("C-FIND got no response from the PACS")
                    if code in PENDING and match is not None:
                        uid = str(match.get("StudyInstanceUID", "") or "")
                        if uid:
                            count = match.get("NumberOfStudyRelatedInstances")
                            found.setdefault(uid, FoundStudy(
                                uid, str(match.get("StudyDate", "") or ""),
                                "\\".join(match.get("ModalitiesInStudy", []) or []) if
                                isinstance(match.get("ModalitiesInStudy"), list) else
                                str(match.get("ModalitiesInStudy", "") or ""),
                                int(count) if count not in (None, "") else None))
                    elif code not in PENDING and code != 0x0000:
                        raise PullError(f"C-FIND failed with status 0x{code:04X}")
    finally:
        assoc.release()
    log.info("C-FIND matched %d stud(y/ies) on %s", len(found), settings.pacs_ae_title)
    return list(found.values())


def _retrieve_identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    return ds


def _tally(report: RetrieveReport, study: str, responses: Any) -> None:
    final = None
    for status, _ in responses:
        if "Status" not in status:
            raise PullError("retrieve got no response from the PACS (timeout)")
        final = status
    if final is None:
        raise PullError("retrieve ended without a final status")
    code = int(final.Status)
    report.completed += int(final.get("NumberOfCompletedSuboperations", 0) or 0)
    report.failed += int(final.get("NumberOfFailedSuboperations", 0) or 0)
    report.warning += int(final.get("NumberOfWarningSuboperations", 0) or 0)
    if code not in (0x0000, 0xB000):
        report.failed_studies.append(study)
        log.error("retrieve of study %s ended with status 0x%04X", study, code)


def _handle_get_store(event: evt.Event, settings: Settings) -> int:
    try:
        result = register_bytes(settings, event.encoded_dataset(include_meta=True),
                                source=f"pull:{settings.pacs_ae_title}",
                                min_free_mb=settings.scp_min_free_mb)
    except StorageFullError:
        return 0xA700
    return 0xC210 if result.outcome == Outcome.quarantined else 0x0000


def retrieve_studies(settings: Settings, studies: list[FoundStudy], *, method: str = "move",
                     on_study: Callable[[FoundStudy], None] | None = None) -> dict[str, Any]:
    """Retrieve each study; returns sub-operation counts and the studies that failed."""
    report = RetrieveReport(studies=len(studies))
    if not studies:
        return report.__dict__
    ae = _ae(settings)
    kwargs: dict[str, Any] = {}
    if method == "get":
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for context in GET_STORAGE_CONTEXTS:
            ae.add_requested_context(str(context.abstract_syntax))
        kwargs["ext_neg"] = [build_role(str(c.abstract_syntax), scp_role=True)
                             for c in GET_STORAGE_CONTEXTS]
        kwargs["evt_handlers"] = [(evt.EVT_C_STORE, _handle_get_store, [settings])]
    else:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = _associate(settings, ae, **kwargs)
    try:
        for study in studies:
            identifier = _retrieve_identifier(study.study_instance_uid)
            if method == "get":
                responses = assoc.send_c_get(identifier,
                                             StudyRootQueryRetrieveInformationModelGet)
            else:
                responses = assoc.send_c_move(identifier, settings.scp_ae_title,
                                              StudyRootQueryRetrieveInformationModelMove)
            _tally(report, study.study_instance_uid, responses)
            if on_study is not None:
                on_study(study)
    finally:
        if assoc.is_established:
            assoc.release()
    return report.__dict__
