"""``GET /`` (service description and endpoint list), ``GET /health``, ``GET /metrics``.

``/health`` and ``/metrics`` need no authorisation (the gate skips the auth hook for
them); ``/metrics`` is not in the OpenAPI document.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.version import __version__
from dispatcher.api import models as m
from dispatcher.api.deps import StateDep
from dispatcher.api.errors import FORBIDDEN
from dispatcher.api.routes import ENDPOINTS, TAG_API

router = APIRouter()


@router.get(
    "/",
    operation_id="index",
    tags=[TAG_API],
    summary="Service description and endpoint list",
    responses={200: {"model": m.IndexResponse}, **FORBIDDEN},
)
async def index() -> JSONResponse:
    return JSONResponse(
        {
            "name": "ctrl-exec-api",
            "version": __version__,
            "spec": "/openapi.json",
            "live_spec": "/openapi-live.json",
            "endpoints": ENDPOINTS,
        }
    )


@router.get(
    "/health",
    operation_id="health",
    tags=[TAG_API],
    summary="Liveness; needs no authorisation",
    responses={200: {"model": m.HealthResponse}},
)
async def health() -> JSONResponse:
    return JSONResponse({"ok": True, "version": __version__})


@router.get("/metrics", include_in_schema=False)
async def metrics(state: StateDep) -> Response:
    # off the event loop: the collectors stat the registry (dispatcher.api.opsmetrics)
    body = await asyncio.to_thread(generate_latest, state.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
