"""The API's routes, one :class:`~fastapi.APIRouter` per concern.

* :mod:`.service`: ``GET /`` (service description), ``/health``, ``/metrics``;
* :mod:`.runs`: ``POST /ping``, ``POST /run``, ``GET|POST /discovery``, ``GET /status/{reqid}``;
* :mod:`.spec`: ``GET /openapi-live.json`` (``/openapi.json`` is FastAPI's own);
* :mod:`.pairing`: ``GET /pairing``, ``POST /pairing/{reqid}/approve|deny``, leader-only
  and callable on every instance (:mod:`dispatcher.api.leadergate`);
* :mod:`.cluster_control`: ``POST /cluster/switchover``;
* :mod:`.cluster_files`: ``GET /cluster/files/{path}``, the peers' file route (not in
  the OpenAPI document);
* :mod:`.history`: ``GET /runs``, ``GET /runs/{reqid}`` (job history) and the peers'
  ``GET /cluster/runs/{reqid}`` (not in the OpenAPI document).

:func:`~dispatcher.api.app.create_app` adds the routers' routes in this order, which is
the order of the paths in the OpenAPI document. This module is the route table the rest of
the API shares: the tags, the endpoint list ``GET /`` shows and the metrics label of a
path. It imports no router.
"""

from __future__ import annotations

from typing import Any

TAG_API = "api"
TAG_RUN = "run"
TAG_STATUS = "status"
TAG_CLUSTER = "cluster"
PEER_PREFIX = "/cluster/files/"  # peer routes: dispatcher certificate, no auth hook
PEER_RUNS = "/cluster/runs/"  # the peers' job history route (dispatcher/api/routes/history.py)
PEER_PREFIXES = (PEER_PREFIX, PEER_RUNS)

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
    {"method": "GET", "path": "/runs"},
    {"method": "GET", "path": "/runs/{reqid}"},
    {"method": "GET", "path": "/openapi.json"},
    {"method": "GET", "path": "/openapi-live.json"},
    {"method": "GET", "path": "/pairing"},
    {"method": "POST", "path": "/pairing/{reqid}/approve"},
    {"method": "POST", "path": "/pairing/{reqid}/deny"},
    {"method": "POST", "path": "/cluster/switchover"},
]
_ROUTES = {e["path"] for e in ENDPOINTS} | {"/metrics"}


def route_label(path: str) -> str:
    """Low-cardinality route name for metrics: a route template or ``other``."""
    if path in _ROUTES:
        return path
    if path.startswith("/status/"):
        return "/status/{reqid}"
    if path.startswith("/runs/"):
        return "/runs/{reqid}"
    if path.startswith(PEER_PREFIX):
        return PEER_PREFIX + "{path}"
    if path.startswith(PEER_RUNS):
        return PEER_RUNS + "{reqid}"
    if path.startswith("/pairing/"):
        for verb in ("approve", "deny"):
            if path.endswith(f"/{verb}"):
                return f"/pairing/{{reqid}}/{verb}"
    return "other"
