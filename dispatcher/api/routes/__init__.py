"""The API's routes, one :class:`~fastapi.APIRouter` per concern.

* :mod:`.service`: ``GET /`` (service description), ``/health``, ``/metrics``;
* :mod:`.runs`: ``POST /ping``, ``POST /run``, ``GET|POST /discovery``, ``GET /status/{reqid}``;
* :mod:`.spec`: ``GET /openapi-live.json`` (``/openapi.json`` is FastAPI's own);
* cluster routes, leader-only actions callable on every instance and the peers' file
  route: :mod:`dispatcher.api.cluster_routes`.

:func:`~dispatcher.api.app.create_app` includes the routers in this order, which is the
order of the paths in the OpenAPI document. This module is the route table the rest of
the API shares: the tags, the endpoint list ``GET /`` shows and the metrics label of a
path. It imports no router.
"""

from __future__ import annotations

from typing import Any

from dispatcher.api import cluster_routes

TAG_API = "api"
TAG_RUN = "run"
TAG_STATUS = "status"
TAG_CLUSTER = cluster_routes.TAG_CLUSTER
PEER_PREFIX = cluster_routes.PEER_PREFIX  # peer routes: dispatcher certificate, no auth hook

TAGS: list[dict[str, Any]] = [
    {"name": TAG_API, "description": "Service description, health and specification"},
    {"name": TAG_RUN, "description": "Run, ping and discovery on agents"},
    {"name": TAG_STATUS, "description": "Results of recorded runs"},
    {
        "name": TAG_CLUSTER,
        "description": "Leader-only actions (pairing decisions, switchover) from any instance",
    },
]

ENDPOINTS: list[dict[str, str]] = [
    {"method": "GET", "path": "/"},
    {"method": "GET", "path": "/health"},
    {"method": "POST", "path": "/ping"},
    {"method": "POST", "path": "/run"},
    {"method": "GET", "path": "/discovery"},
    {"method": "POST", "path": "/discovery"},
    {"method": "GET", "path": "/status/{reqid}"},
    {"method": "GET", "path": "/openapi.json"},
    {"method": "GET", "path": "/openapi-live.json"},
    *cluster_routes.ENDPOINTS,
]
_ROUTES = {e["path"] for e in ENDPOINTS} | {"/metrics"}


def route_label(path: str) -> str:
    """Low-cardinality route name for metrics: a route template or ``other``."""
    if path in _ROUTES:
        return path
    if path.startswith("/status/"):
        return "/status/{reqid}"
    return cluster_routes.route_label(path) or "other"
