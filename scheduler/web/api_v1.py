"""REST API v1 (`/api/v1/...`): studies, their timelines, findings, jobs, models, status and
heatmaps, for RIS/worklist tools and the dashboard.

Reads go through :mod:`db.study_queries` and :mod:`db.queries`; writes through the one module
that owns each transition (:mod:`db.jobs`, :mod:`db.model_registry`), and every write adds an
``api_audit`` event naming the token that made it. Bad input is a 4xx with a JSON body.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import jobs as job_states
from db import study_queries as q
from db.models import Event, Job, JobState, Model
from db.queries import status as query_status
from db.session import session_scope
from lightbox.errors import LightboxError, ModelNotFoundError
from lightbox.heatmaps import heatmap_path, load_heatmap
from lightbox.roots import stored_file
from lightbox.settings import Settings
from scheduler.web.auth import SESSION_COOKIE, Authenticator, Principal

StudyState = Enum("StudyState", {s: s for s in q.STUDY_STATES}, type=str)  # type: ignore[misc]
JobStateName = Enum("JobStateName", {s.value: s.value for s in JobState}, type=str)  # type: ignore[misc]


class PriorityName(str, Enum):
    stat = "stat"
    routine = "routine"


class Format(str, Enum):
    json = "json"
    csv = "csv"


def _plain(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def fast_json(payload: Any) -> Response:
    """JSON straight from ``json.dumps``: FastAPI's ``jsonable_encoder`` walks every value of a
    500-row page in Python first, which costs more than the query behind it."""
    return Response(json.dumps(payload, default=_plain), media_type="application/json")


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def requirer(auth: Authenticator) -> Callable[[str], Callable[[Request], Principal]]:
    """``Depends(require("operator"))``: a bearer token, or the dashboard's session cookie
    (whose writes must carry its CSRF token in ``X-CSRF-Token``). 401 without either, 403 for a
    role that may not do this."""

    def require(role: str) -> Callable[[Request], Principal]:
        def dependency(request: Request) -> Principal:
            principal = auth.by_bearer(request.headers.get("authorization", ""))
            if principal is None:
                principal = auth.by_session(request.cookies.get(SESSION_COOKIE))
                if principal is not None and request.method not in ("GET", "HEAD") and not (
                        request.headers.get("x-csrf-token") == principal.csrf):
                    raise HTTPException(403, "missing or wrong CSRF token")
            if principal is None:
                raise HTTPException(401, "missing or invalid bearer token",
                                    headers={"WWW-Authenticate": "Bearer"})
            if not principal.may(role):
                raise HTTPException(403, f"token '{principal.name}' has role "
                                         f"'{principal.role}'; this needs '{role}'")
            return principal
        return dependency
    return require


def audit(session: Session, principal: Principal, action: str, *, job_id: int | None = None,
          study_uid: str | None = None, **detail: Any) -> None:
    """The audit record of one write: who (token name and role), what, on what."""
    session.add(Event(kind="api_audit", job_id=job_id, study_instance_uid=study_uid,
                      detail={"token": principal.name, "role": principal.role,
                              "action": action, **detail}))


def token_actor(principal: Principal) -> str:
    """Who acts, in the registry's audit events (``model_promoted``, ``model_retired``): the
    API token's name, as the CLI names the OS user (``os:NAME``)."""
    return f"token:{principal.name}"


def heatmap_url(settings: Settings, job_id: int, sop: str | None) -> str | None:
    if sop and heatmap_path(settings, job_id, sop).is_file():
        return f"/api/v1/heatmaps/{job_id}/{sop}.png"
    return None


def study_payload(settings: Settings, session: Session, study_uid: str) -> dict[str, Any]:
    detail = q.study_detail(session, study_uid)
    if detail is None:
        raise HTTPException(404, f"no study {study_uid}")
    for finding in detail["findings"]:
        finding["heatmap_url"] = heatmap_url(settings, finding["job_id"],
                                             finding["sop_instance_uid"])
    return detail


def queue_depth(settings: Settings) -> dict[str, int] | None:
    """Messages waiting in Redis per priority; None when Redis does not answer."""
    from lightbox.redis_server import broker_url, redis_client
    from lightbox.task_names import queue_keys

    try:
        client = redis_client(broker_url(settings, start=False))
        stat_key, routine_key = queue_keys()
        return {"stat": int(client.llen(stat_key)), "routine": int(client.llen(routine_key))}
    except Exception:  # noqa: BLE001 - Redis down is a status to report, not an error
        return None


def status_report(settings: Settings, session: Session) -> dict[str, Any]:
    """What `lightbox status --format json` prints."""
    report = query_status(session, limit=50)
    depth = queue_depth(settings)
    report["queue_depth"] = None if depth is None else sum(depth.values())
    report["queue_depth_by_priority"] = depth
    for row in report["quarantined"]:
        row.pop("name", None)  # original file names may carry patient names
        row.pop("path", None)
    return report


def render_heatmap(settings: Settings, session: Session, job_id: int, sop: str,
                   label: str | None) -> bytes:
    """The job's class-activation map for one image drawn over that image, as PNG."""
    from PIL import Image

    from lightbox.manifest import PreprocessSpec
    from lightbox.pixels import decode_frame, read_dataset, to_display
    from scheduler.export.dicom.heatmap_sc import overlay

    cam = load_heatmap(settings, job_id, sop)
    if cam is None:
        raise HTTPException(404, f"no heatmap for job {job_id} and instance {sop}")
    job = session.get(Job, job_id)
    labels: list[str] = list((job.model.manifest or {}).get("labels", [])) if job else []
    index = 0
    if label is not None:
        if label not in labels:
            raise HTTPException(400, f"label must be one of {labels}")
        index = labels.index(label)
    stored = q.heatmap_source(session, job_id, sop)
    if stored is None:
        raise HTTPException(404, f"the image of instance {sop} is no longer stored")
    try:
        source = read_dataset(stored_file(settings, stored))
        display = to_display(decode_frame(source), source, PreprocessSpec())
    except (OSError, ValueError, LightboxError) as exc:
        raise HTTPException(404, f"the image of instance {sop} cannot be read: {exc}") from exc
    buffer = io.BytesIO()
    Image.fromarray(overlay(display, cam[min(index, len(cam) - 1)])).save(buffer, format="PNG")
    return buffer.getvalue()


def make_router(settings: Settings, auth: Authenticator) -> APIRouter:
    require = requirer(auth)
    reader, operator = Depends(require("read")), Depends(require("operator"))
    router = APIRouter(prefix="/api/v1")
    url = settings.sqlalchemy_url

    @router.get("/studies", summary="Studies, newest first, filtered; keyset pages",
                response_class=Response)
    def studies(since: datetime | None = None, until: datetime | None = None,
                modality: str | None = Query(None, max_length=16),
                state: StudyState | None = None, label: str | None = Query(None, max_length=64),
                min_score: float | None = None, priority: PriorityName | None = None,
                after: str | None = Query(None, max_length=200),
                limit: int = Query(50, ge=1, le=q.MAX_PAGE),
                _: Principal = reader) -> Response:
        filters = q.StudyFilters(since=_utc(since), until=_utc(until), modality=modality,
                                 state=state.value if state else None, label=label,
                                 min_score=min_score,
                                 priority=priority.value if priority else None)
        with session_scope(url) as session:
            page = q.list_studies(session, filters, after=after, limit=limit)
        return fast_json({"items": page.items, "next": page.next_cursor})

    @router.get("/studies/{study_uid}", summary="One study: series, jobs, findings, exports, "
                "timeline")
    def study(study_uid: str, _: Principal = reader) -> Response:
        with session_scope(url) as session:
            return fast_json(study_payload(settings, session, study_uid))

    @router.get("/findings", summary="Findings (the filters of `lightbox results`); JSON pages "
                "or a streamed CSV", response_model=None)
    def findings(study: str | None = Query(None, max_length=64),
                 label: str | None = Query(None, max_length=64),
                 min_score: float | None = None, since: datetime | None = None,
                 all: bool = False, format: Format = Format.json,  # noqa: A002
                 after: str | None = Query(None, max_length=200),
                 limit: int = Query(100, ge=1, le=q.MAX_PAGE),
                 _: Principal = reader) -> Response:
        filters = q.FindingFilters(study_uid=study, label=label, min_score=min_score,
                                   since=_utc(since), include_superseded=all)
        if format == Format.csv:
            return StreamingResponse(_csv_rows(url, filters), media_type="text/csv",
                                     headers={"Content-Disposition":
                                              'attachment; filename="findings.csv"'})
        with session_scope(url) as session:
            page = q.list_findings(session, filters, after=after, limit=limit)
        return fast_json({"items": page.items, "next": page.next_cursor})

    @router.get("/jobs", summary="Jobs, newest first; keyset pages")
    def jobs(state: JobStateName | None = None, after: str | None = Query(None, max_length=200),
             limit: int = Query(100, ge=1, le=q.MAX_PAGE),
             _: Principal = reader) -> Response:
        with session_scope(url) as session:
            page = q.list_jobs(session, state=state.value if state else None, after=after,
                               limit=limit)
        return fast_json({"items": page.items, "next": page.next_cursor})

    @router.get("/jobs/{job_id}", summary="One job")
    def job(job_id: int, _: Principal = reader) -> dict[str, Any]:
        with session_scope(url) as session:
            row = q.get_job(session, job_id)
        if row is None:
            raise HTTPException(404, f"no job {job_id}")
        return row

    @router.post("/jobs/{job_id}/retry", summary="Queue a failed, dead or cancelled job again "
                 "(operator)")
    def retry(job_id: int, who: Principal = operator) -> dict[str, Any]:
        return job_transition(job_id, who, "retry")

    @router.post("/jobs/{job_id}/cancel", summary="Cancel a job that has not finished "
                 "(operator)")
    def cancel(job_id: int, who: Principal = operator) -> dict[str, Any]:
        return job_transition(job_id, who, "cancel")

    def job_transition(job_id: int, who: Principal, action: str) -> dict[str, Any]:
        with session_scope(url) as session:
            found = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
            if found is None:
                raise HTTPException(404, f"no job {job_id}")
            previous = found.state.value
            done = (job_states.retry(session, found, by=f"api:{who.name}") if action == "retry"
                    else job_states.cancel(session, found))
            if not done:
                allowed = ("failed, dead or cancelled" if action == "retry"
                           else "queued, running or failed")
                raise HTTPException(409, f"job {job_id} is {previous}; only {allowed} jobs "
                                         f"can be {action}{'l' * (action == 'cancel')}ed")
            audit(session, who, action, job_id=job_id, previous=previous)
            return {"job_id": job_id, "previous": previous, "state": found.state.value}

    @router.get("/models", summary="Registered model versions")
    def models(_: Principal = reader) -> list[dict[str, Any]]:
        from db.model_registry import list_models

        with session_scope(url) as session:
            return [q.model_row(m) for m in list_models(session)]

    @router.get("/models/{name}/{version}", summary="One model version: manifest metrics, "
                "thresholds, training summary")
    def model(name: str, version: str, _: Principal = reader) -> dict[str, Any]:
        from db.model_registry import get_model

        with session_scope(url) as session:
            try:
                return q.model_row(get_model(session, name, version), full=True)
            except ModelNotFoundError as exc:
                raise HTTPException(404, str(exc)) from exc

    def change_stage(action: str, change: Callable[..., Model], name: str, version: str,
                     who: Principal, reason: str | None) -> dict[str, Any]:
        """Promote or retire through the registry (its audit event names the token), then
        this API's own audit event."""
        with session_scope(url) as session:
            try:
                row = change(session, name, version, reason=reason, actor=token_actor(who))
            except ModelNotFoundError as exc:
                raise HTTPException(404, str(exc)) from exc
            audit(session, who, action, model=name, version=version)
            return q.model_row(row)

    @router.post("/models/{name}/{version}/promote", summary="Make this version the production "
                 "one (operator)")
    def promote(name: str, version: str, who: Principal = operator,
                reason: str | None = Query(None, max_length=500)) -> dict[str, Any]:
        from db.model_registry import promote as promote_model

        return change_stage("promote", promote_model, name, version, who, reason)

    @router.post("/models/{name}/{version}/retire", summary="Take this version out of service "
                 "(operator)")
    def retire(name: str, version: str, who: Principal = operator,
               reason: str | None = Query(None, max_length=500)) -> dict[str, Any]:
        from db.model_registry import retire as retire_model

        return change_stage("retire", retire_model, name, version, who, reason)

    @router.get("/status", summary="What `lightbox status --format json` gives")
    def status(_: Principal = reader) -> dict[str, Any]:
        with session_scope(url) as session:
            return status_report(settings, session)

    @router.get("/heatmaps/{job_id}/{sop_instance_uid}.png", summary="A heatmap over its image",
                response_class=Response)
    def heatmap(job_id: int, sop_instance_uid: str,
                label: str | None = Query(None, max_length=64),
                _: Principal = reader) -> Response:
        with session_scope(url) as session:
            png = render_heatmap(settings, session, job_id, sop_instance_uid, label)
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300"})

    return router


def _csv_rows(url: str, filters: q.FindingFilters) -> Iterator[str]:
    """The CSV, a chunk of rows at a time (a million findings never sit in memory)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(q.FINDING_KEYS)
    with session_scope(url) as session:
        for i, row in enumerate(q.iter_findings(session, filters), start=1):
            writer.writerow([v.isoformat() if isinstance(v, datetime) else v
                             for v in row.values()])
            if i % 500 == 0:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
    yield buffer.getvalue()

