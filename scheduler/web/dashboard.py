"""The web dashboard served by `lightbox api` at ``/``: server-rendered pages (Jinja2), a little
plain JavaScript that refreshes the live parts, charts drawn as inline SVG on the server. No
CDN, no external fonts, no build step: hospitals are often offline.

Sign-in exchanges a token for a signed, HTTP-only, SameSite=Strict session cookie
(:mod:`scheduler.web.auth`); every POST form carries the session's CSRF token, and the sign-in
form a double-submit one. Pages show studies by UID, modality, date, body part and sending AE
only: Lightbox stores no patient name or ID.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import select

from db import study_queries as q
from db.models import Job, JobState
from db.session import session_scope
from lightbox.errors import ModelNotFoundError
from lightbox.roots import bundle_dir
from lightbox.settings import Settings
from scheduler.web.api_v1 import audit, queue_depth, study_payload
from scheduler.web.auth import SESSION_COOKIE, SESSION_SECONDS, Authenticator, Principal

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
LOGIN_CSRF_COOKIE = "lightbox_login_csrf"


class SignInRequired(Exception):
    """Raised by a page whose visitor has no valid session: answered with a redirect."""


def _when(value: datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _short(uid: str | None, keep: int = 22) -> str:
    if not uid:
        return ""
    return uid if len(uid) <= keep else "…" + uid[-keep:]


def throughput_svg(minutes: list[int], width: int = 720, height: int = 160) -> Markup:
    """Images per minute over the last hour as an inline SVG bar chart (oldest left)."""
    top = max(max(minutes, default=0), 1)
    pad_left, pad_bottom, pad_top = 40, 22, 10
    plot_w, plot_h = width - pad_left - 8, height - pad_bottom - pad_top
    bar = plot_w / max(len(minutes), 1)
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" '
             f'aria-label="images per minute, last hour, peak {top}">',
             f'<line x1="{pad_left}" y1="{pad_top + plot_h}" x2="{width - 8}" '
             f'y2="{pad_top + plot_h}" class="axis"/>',
             f'<text x="{pad_left - 6}" y="{pad_top + 8}" class="tick" '
             f'text-anchor="end">{top}</text>',
             f'<text x="{pad_left - 6}" y="{pad_top + plot_h}" class="tick" '
             'text-anchor="end">0</text>']
    for i, count in enumerate(minutes):
        h = plot_h * count / top
        parts.append(f'<rect class="bar" x="{pad_left + i * bar + 1:.1f}" '
                     f'y="{pad_top + plot_h - h:.1f}" width="{max(bar - 2, 1):.1f}" '
                     f'height="{h:.1f}"><title>{60 - i} min ago: {count}</title></rect>')
    for minutes_ago in (60, 45, 30, 15, 0):
        x = pad_left + (60 - minutes_ago) * bar
        label, anchor = (f"-{minutes_ago} min", "middle") if minutes_ago else ("now", "end")
        parts.append(f'<text x="{x:.1f}" y="{height - 6}" class="tick" '
                     f'text-anchor="{anchor}">{label}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def make_dashboard(settings: Settings, auth: Authenticator) -> APIRouter:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    env.filters["when"] = _when
    env.filters["short"] = _short
    env.filters["q"] = lambda v: quote(str(v), safe="")
    router = APIRouter(include_in_schema=False)
    url = settings.sqlalchemy_url

    def render(name: str, request: Request, who: Principal | None, status: int = 200,
               **context: Any) -> HTMLResponse:
        html = env.get_template(name).render(request=request, who=who, page=name, **context)
        return HTMLResponse(html, status_code=status,
                            headers={"Cache-Control": "no-store",
                                     "Content-Security-Policy": "default-src 'self'; "
                                     "img-src 'self' data:; style-src 'self'; "
                                     "frame-ancestors 'none'",
                                     "X-Content-Type-Options": "nosniff"})

    def signed_in(request: Request) -> Principal:
        who = auth.by_session(request.cookies.get(SESSION_COOKIE))
        if who is None:
            raise SignInRequired()
        return who

    async def form(request: Request) -> dict[str, str]:
        body = (await request.body()).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}

    def check_csrf(who: Principal, fields: dict[str, str]) -> None:
        if not hmac.compare_digest(fields.get("csrf", ""), who.csrf):
            raise HTTPException(403, "missing or wrong CSRF token (reload the page)")

    @router.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, error: str | None = None) -> HTMLResponse:
        token = secrets.token_urlsafe(24)
        response = render("login.html", request, None, csrf=token, error=error)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", max_age=3600)
        return response

    @router.post("/login")
    async def login(request: Request) -> Response:
        fields = await form(request)
        expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not expected or not hmac.compare_digest(fields.get("csrf", ""), expected):
            return RedirectResponse("/login?error=expired", status_code=303)
        who = auth.by_token(fields.get("token", ""))
        if who is None:
            return RedirectResponse("/login?error=token", status_code=303)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, auth.make_session(who), httponly=True,
                            samesite="strict", secure=request.url.scheme == "https",
                            max_age=SESSION_SECONDS)
        response.delete_cookie(LOGIN_CSRF_COOKIE)
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        who = signed_in(request)
        check_csrf(who, await form(request))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @router.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> HTMLResponse:
        who = signed_in(request)
        with session_scope(url) as session:
            data = q.overview(session)
        return render("overview.html", request, who, data=data, depth=queue_depth(settings),
                      chart=throughput_svg(data["throughput"]["minutes"]))

    @router.get("/studies", response_class=HTMLResponse)
    def studies(request: Request) -> HTMLResponse:
        who = signed_in(request)
        params = request.query_params
        try:
            filters = q.StudyFilters(
                modality=params.get("modality") or None,
                state=params.get("state") if params.get("state") in q.STUDY_STATES else None,
                label=params.get("label") or None,
                min_score=float(params["min_score"]) if params.get("min_score") else None,
                priority=params.get("priority") if params.get("priority") in (
                    "stat", "routine") else None,
                since=_date(params.get("since")), until=_date(params.get("until")))
            with session_scope(url) as session:
                page = q.list_studies(session, filters, after=params.get("after") or None,
                                      limit=50)
        except (ValueError, q.CursorError) as exc:
            return render("studies.html", request, who, status=400, page_data=None,
                          error=str(exc), params=params, states=q.STUDY_STATES)
        next_params = {k: v for k, v in params.items() if k != "after"}
        return render("studies.html", request, who, page_data=page, params=params,
                      next_params=next_params, states=q.STUDY_STATES, error=None)

    @router.get("/studies/{study_uid}", response_class=HTMLResponse)
    def study(request: Request, study_uid: str) -> HTMLResponse:
        who = signed_in(request)
        with session_scope(url) as session:
            try:
                detail = study_payload(settings, session, study_uid)
            except HTTPException:
                return render("missing.html", request, who, status=404,
                              what=f"study {study_uid}")
        return render("study.html", request, who, s=detail)

    @router.get("/jobs", response_class=HTMLResponse)
    def jobs(request: Request) -> HTMLResponse:
        who = signed_in(request)
        with session_scope(url) as session:
            dead = q.list_jobs(session, state="dead", limit=200).items
            failed = q.list_jobs(session, state="failed", limit=200).items
            recent = q.list_jobs(session, limit=30).items
        return render("jobs.html", request, who, problems=dead + failed, recent=recent,
                      message=request.query_params.get("message"))

    @router.post("/jobs/{job_id}/retry")
    async def retry(request: Request, job_id: int) -> Response:
        from db import jobs as job_states

        who = signed_in(request)
        check_csrf(who, await form(request))
        if not who.may("operator"):
            raise HTTPException(403, f"token '{who.name}' has role '{who.role}'; retry needs "
                                     "'operator'")
        with session_scope(url) as session:
            job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
            if job is None:
                raise HTTPException(404, f"no job {job_id}")
            previous = job.state.value
            if job.state not in (JobState.failed, JobState.dead, JobState.cancelled):
                message = f"job {job_id} is {previous}: not retried"
            else:
                job_states.retry(session, job, by=f"dashboard:{who.name}")
                audit(session, who, "retry", job_id=job_id, previous=previous,
                      via="dashboard")
                message = f"job {job_id} queued again"
        return RedirectResponse(f"/jobs?message={quote(message)}", status_code=303)

    @router.get("/models", response_class=HTMLResponse)
    def models(request: Request) -> HTMLResponse:
        from db.model_registry import list_models

        who = signed_in(request)
        with session_scope(url) as session:
            rows = [q.model_row(m) for m in list_models(session)]
        return render("models.html", request, who, models=rows,
                      message=request.query_params.get("message"))

    @router.get("/models/{name}/{version}", response_class=HTMLResponse)
    def model(request: Request, name: str, version: str) -> HTMLResponse:
        from db.model_registry import get_model

        who = signed_in(request)
        with session_scope(url) as session:
            try:
                row = q.model_row(get_model(session, name, version), full=True)
            except ModelNotFoundError:
                return render("missing.html", request, who, status=404,
                              what=f"model {name} {version}")
        return render("model.html", request, who, m=row)

    @router.get("/models/{name}/{version}/plots/{plot}")
    def model_plot(request: Request, name: str, version: str, plot: str) -> FileResponse:
        from db.model_registry import get_model

        signed_in(request)
        with session_scope(url) as session:
            try:
                row = get_model(session, name, version)
            except ModelNotFoundError as exc:
                raise HTTPException(404, str(exc)) from exc
            plots = (row.manifest or {}).get("plots", [])
            bundle = bundle_dir(settings, row.bundle_path)
        if plot not in plots or not (bundle / plot).is_file():
            raise HTTPException(404, f"no plot {plot} in model {name} {version}")
        return FileResponse(bundle / plot, media_type="image/png")

    @router.post("/models/{name}/{version}/promote")
    async def promote(request: Request, name: str, version: str) -> Response:
        from db.model_registry import promote as promote_model

        who = signed_in(request)
        check_csrf(who, await form(request))
        if not who.may("operator"):
            raise HTTPException(403, f"token '{who.name}' has role '{who.role}'; promote needs "
                                     "'operator'")
        with session_scope(url) as session:
            try:
                promote_model(session, name, version)
            except ModelNotFoundError as exc:
                raise HTTPException(404, str(exc)) from exc
            audit(session, who, "promote", model=name, version=version, via="dashboard")
        message = quote(f"{name} {version} is now in production")
        return RedirectResponse(f"/models?message={message}", status_code=303)

    @router.get("/static/{name}")
    def static(name: str) -> FileResponse:
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise HTTPException(404, "no such file")
        media = {"css": "text/css", "js": "text/javascript"}.get(path.suffix[1:],
                                                                 "application/octet-stream")
        return FileResponse(path, media_type=media, headers={"Cache-Control": "max-age=3600"})

    return router


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
