"""The HTTP API (`lightbox api`): DICOMweb STOW-RS, bearer-token protected.

Small on purpose: the one write path hospitals need over HTTP. Every request needs
``Authorization: Bearer $LIGHTBOX_API_TOKEN``; the API refuses to start without a token.
"""

from __future__ import annotations

import secrets

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from lightbox.errors import ConfigurationError, StowRequestError
from lightbox.settings import Settings
from scheduler.stow import response_body, stow

DICOM_JSON = "application/dicom+json"


def _authorise(settings: Settings, request: Request) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    expected = settings.api_token or ""
    if scheme.lower() != "bearer" or not expected or not secrets.compare_digest(
            token.strip().encode(), expected.encode()):
        raise HTTPException(401, "missing or invalid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


def make_app(settings: Settings) -> FastAPI:
    if not settings.api_token:
        raise ConfigurationError("LIGHTBOX_API_TOKEN is required for the API")
    app = FastAPI(title="Lightbox", docs_url=None, redoc_url=None)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/dicom-web/studies")
    async def store_instances(request: Request) -> JSONResponse:
        """STOW-RS: store instances (any study)."""
        _authorise(settings, request)
        body = await request.body()
        try:
            results = await run_in_threadpool(
                stow, settings, request.headers.get("content-type", ""), body)
        except StowRequestError as exc:
            raise HTTPException(415, str(exc)) from exc
        base = str(request.base_url).rstrip("/") + "/dicom-web"
        status, payload = response_body(results, base)
        return JSONResponse(payload, status_code=status, media_type=DICOM_JSON)

    return app
