"""The OpenAPI document: how it is generated, and ``GET /openapi-live.json``.

FastAPI serves ``/openapi.json`` itself from :func:`document` (see
:class:`~dispatcher.api.app.ApiApp`); the checked-in ``dispatcher/api/openapi.json``
is that document (:mod:`dispatcher.api.openapi_dump`). Validation errors answer 400
here, so FastAPI's 422 responses and schemas are dropped from it. The live variant lists
the registered host names as an ``enum`` on every ``hosts`` array.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from dispatcher.api.deps import DispatcherDep
from dispatcher.api.errors import FORBIDDEN
from dispatcher.api.routes import TAG_API, TAGS

router = APIRouter()


def document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of ``app`` (no 422 responses)."""
    return _strip_422(
        get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            description=app.description,
            routes=app.routes,
            tags=TAGS,
            servers=app.servers,
            separate_input_output_schemas=False,
        )
    )


def _strip_422(spec: dict[str, Any]) -> dict[str, Any]:
    """Drop FastAPI's 422 responses and schemas: validation errors answer 400 here."""
    for item in spec.get("paths", {}).values():
        for op in item.values():
            if isinstance(op, dict):
                op.get("responses", {}).pop("422", None)
    schemas = spec.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return spec


def live_spec(base: dict[str, Any], hosts: list[str]) -> dict[str, Any]:
    """The spec with the registered host names as an ``enum`` on every ``hosts`` array."""
    spec = copy.deepcopy(base)
    if not hosts:
        return spec
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("PingRequest", "RunRequest", "DiscoveryRequest"):
        prop = schemas.get(name, {}).get("properties", {}).get("hosts")
        if not isinstance(prop, dict):
            continue
        for variant in [prop, *prop.get("anyOf", [])]:
            if variant.get("type") == "array":
                variant["items"] = {"type": "string", "enum": sorted(hosts)}
    return spec


@router.get("/openapi-live.json", operation_id="openapi_live", tags=[TAG_API],
            summary="The OpenAPI document with registered host names as enums",
            responses={200: {"description": "OpenAPI 3.1 document"}, **FORBIDDEN})  # fmt: skip
async def openapi_live(request: Request, d: DispatcherDep) -> JSONResponse:
    return JSONResponse(live_spec(request.app.openapi(), d.registry.names()))
