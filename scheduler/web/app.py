"""The HTTP API (`lightbox api`): DICOMweb STOW-RS, the REST API v1 and the dashboard.

Every request but ``/health``, ``/login`` and the static files needs a token
(:mod:`scheduler.web.auth`): a bearer token, or the dashboard's session cookie. The API refuses
to start without one. The OpenAPI schema (``/openapi.json``) and its reference page (``/docs``)
sit behind the same auth: the schema tells an attacker where to push.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from db.session import session_scope
from lightbox.errors import StowRequestError
from lightbox.settings import Settings
from scheduler.ingest.stow import (
    StowTooLarge,
    response_body,
    stage_request,
    store_parts,
)
from scheduler.web.api_v1 import audit, make_router, requirer
from scheduler.web.auth import Authenticator, Principal, load_tokens
from scheduler.web.dashboard import SignInRequired, make_dashboard

DICOM_JSON = "application/dicom+json"
log = logging.getLogger(__name__)


def make_app(settings: Settings) -> FastAPI:
    auth = Authenticator(load_tokens(settings))  # ConfigurationError without any token
    require = requirer(auth)
    reader, operator = Depends(require("read")), Depends(require("operator"))
    app = FastAPI(title="Lightbox", version="1", docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(SignInRequired)
    async def sign_in(request: Request, exc: SignInRequired) -> Response:
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg")}
                  for e in exc.errors()]
        return JSONResponse({"detail": "invalid request", "errors": errors}, status_code=422)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError) -> JSONResponse:
        # Bad cursors and values the database refuses are the caller's input, not our fault.
        return JSONResponse({"detail": str(exc)[:300]}, status_code=400)

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/dicom-web/studies", summary="STOW-RS: store instances (operator)")
    async def store_instances(request: Request,
                              who: Principal = operator) -> JSONResponse:
        try:  # streamed to files part by part (scheduler.ingest.stow): bounded memory
            parts = await stage_request(settings, request.headers.get("content-type", ""),
                                        request.headers.get("content-length"), request.stream())
        except StowTooLarge as exc:
            raise HTTPException(413, str(exc)) from exc
        except StowRequestError as exc:
            raise HTTPException(415, str(exc)) from exc
        results = await run_in_threadpool(store_parts, settings, parts)
        base = str(request.base_url).rstrip("/") + "/dicom-web"
        status, payload = response_body(results, base)
        with session_scope(settings.sqlalchemy_url) as session:
            audit(session, who, "stow", stored=sum(r.failure is None for r in results),
                  failed=sum(r.failure is not None for r in results))
        return JSONResponse(payload, status_code=status, media_type=DICOM_JSON)

    app.include_router(make_router(settings, auth))
    app.include_router(make_dashboard(settings, auth))

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_: Principal = reader) -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs(request: Request, who: Principal = reader) -> HTMLResponse:
        from jinja2 import Environment, FileSystemLoader, select_autoescape

        from scheduler.web.dashboard import TEMPLATES

        env = Environment(loader=FileSystemLoader(TEMPLATES),
                          autoescape=select_autoescape(["html"]))
        operations = [
            {"method": method.upper(), "path": path, "summary": op.get("summary", ""),
             "params": [p["name"] for p in op.get("parameters", [])]}
            for path, item in app.openapi()["paths"].items() for method, op in item.items()]
        return HTMLResponse(env.get_template("docs.html").render(
            request=request, who=who, page="docs.html", operations=operations))

    return app
