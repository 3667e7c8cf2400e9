"""The HTTP API of one dispatcher instance (upstream spec section 9) on FastAPI.

Routes, bodies, status codes and error shapes are upstream's. Every request first goes
through :class:`ApiGate`, a plain ASGI middleware that does what upstream's request
parser and pre-route check do: at most 32 header lines (431), bodies up to 1 MiB (413),
one ``api-request`` log line, and the ``api`` auth hook call, which covers every route
except ``/health`` and ``/metrics`` (upstream also gates ``/health``; its own docs say it
should not, DESIGN.md section 2). Each route then authorises its own action through
:mod:`dispatcher.operations`.

The operator identity of a TLS client certificate (see :mod:`dispatcher.api.peercert`)
goes into ``Caller.identity`` and into the ``api-request`` log line.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.common import logfmt
from agent.version import __version__
from dispatcher.api import cluster_routes
from dispatcher.api import models as m
from dispatcher.api.peercert import operator_identity, state_of
from dispatcher.core import Dispatcher
from dispatcher.operations import (
    Caller,
    Denied,
    authorise,
    do_discovery,
    do_ping,
    do_run,
    do_status,
)
from dispatcher.registry import RegistryError
from dispatcher.runlocks import LockConflict
from dispatcher.runstore import RunStoreError

if TYPE_CHECKING:
    from dispatcher.ha.node import HANode

MAX_BODY = 1024 * 1024
MAX_HEADERS = 32
UNGATED = frozenset({"/health", "/metrics"})
PEER_PREFIX = cluster_routes.PEER_PREFIX  # peer routes: dispatcher certificate, no auth hook
REQID_RE = re.compile(r"[a-f0-9]+")
TAG_API = "api"
TAG_RUN = "run"
TAG_STATUS = "status"

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

Responses = dict[int | str, dict[str, Any]]
_ERR: dict[str, Any] = {"model": m.ErrorResponse}
BAD_REQUEST: Responses = {400: {**_ERR, "description": "Bad request"}}
FORBIDDEN: Responses = {403: {**_ERR, "description": "Denied by the auth hook"}}
NOT_FOUND: Responses = {404: {**_ERR, "description": "Unknown agent or run"}}
CONFLICT: Responses = {409: {**_ERR, "description": "host:script already running (code 4)"}}


def error(status: int, err: str, detail: str | None = None, **extra: Any) -> JSONResponse:
    """An upstream error body ``{"ok":false,"error",["detail"],...}``."""
    body: dict[str, Any] = {"ok": False, "error": err}
    if detail is not None:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status)


def denial(exc: Denied, generic: bool) -> JSONResponse:
    if generic:
        return error(403, "forbidden")
    return error(403, exc.reason, code=exc.code)


def route_label(path: str) -> str:
    """Low-cardinality route name for metrics: a route template or ``other``."""
    if path in _ROUTES:
        return path
    if path.startswith("/status/"):
        return "/status/{reqid}"
    return cluster_routes.route_label(path) or "other"


def outcome_label(status: int) -> str:
    if 200 <= status < 300:
        return "ok"
    return {
        400: "bad_request",
        403: "denied",
        404: "not_found",
        409: "locked",
        413: "too_large",
        431: "too_large",
        503: "busy",
    }.get(status, "error" if status >= 500 else str(status))


def _body_fields(body: bytes) -> tuple[str, str]:
    """``username`` and ``token`` of a JSON object body (upstream reads them pre-route)."""
    if not body.lstrip().startswith(b"{"):
        return "", ""
    try:
        obj = json.loads(body)
    except ValueError:
        return "", ""
    if not isinstance(obj, dict):
        return "", ""
    user, token = obj.get("username"), obj.get("token")
    return (user if isinstance(user, str) else ""), (token if isinstance(token, str) else "")


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k.lower() == name:
            return bytes(v).decode("latin-1")
    return None


def bearer_token(value: str | None) -> str:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return ""


def _peer_ip(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


class ApiGate:
    """Pre-route checks of every request: limits, ``api-request`` log, ``api`` auth."""

    def __init__(
        self, app: ASGIApp, d: Dispatcher, requests: Counter,
        draining: Callable[[], bool] | None = None, issuers: frozenset[str] | None = None,
    ) -> None:  # fmt: skip
        self.app = app
        self.d = d
        self.requests = requests
        self.draining = draining or (lambda: False)
        self.issuers = issuers
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                if self.draining():  # the client reconnects, through the balancer, elsewhere
                    message = dict(message)
                    message["headers"] = [
                        *(h for h in message.get("headers", []) if h[0].lower() != b"connection"),
                        (b"connection", b"close"),
                    ]
            await send(message)

        try:
            await self._gate(scope, receive, counting_send)
        finally:
            self.requests.labels(route_label(scope["path"]), outcome_label(status[0])).inc()

    async def _gate(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        state = scope.setdefault("state", {})
        peer = state_of(state)
        length_hdr = _header(scope, b"content-length")
        via = state.get("proxy_peer")  # the load balancer, on the PROXY v2 port only
        identity = operator_identity(peer, self.issuers)
        logfmt.event(
            "api-request", method=method, path=path, peer=_peer_ip(scope),
            len=length_hdr or 0, identity=identity,
            **({"via": via} if via else {}),
        )  # fmt: skip
        if len(scope["headers"]) > MAX_HEADERS:
            detail = f"more than {MAX_HEADERS} header lines"
            await error(431, "request header fields too large", detail)(scope, receive, send)
            return
        try:
            declared = int(length_hdr) if length_hdr is not None else 0
        except ValueError:
            await error(400, "invalid Content-Length")(scope, receive, send)
            return
        if declared > MAX_BODY:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body"))
            if len(body) > MAX_BODY:
                await self._too_large(scope, receive, send)
                return
        data = bytes(body)
        # peer routes authenticate the dispatcher certificate themselves, never the hook
        gated = path not in UNGATED and not path.startswith(PEER_PREFIX)
        if gated and self.inflight >= max(1, self.d.cfg.api_max_children):
            await error(503, "busy", "too many concurrent API requests")(scope, receive, send)
            return
        if gated:
            self.inflight += 1
        try:
            if gated:
                user, token = _body_fields(data)
                caller = Caller(
                    kind="api", username=user,
                    token=token or bearer_token(_header(scope, b"authorization")),
                    source_ip=_peer_ip(scope), identity=identity,
                )  # fmt: skip
                try:
                    await authorise(self.d, caller, "api")
                except Denied as exc:
                    await denial(exc, self.d.cfg.auth_deny_generic)(scope, receive, send)
                    return
            if data:  # upstream parses any body as JSON, whatever its Content-Type says
                scope = dict(scope)
                scope["headers"] = [
                    (k, v) for k, v in scope["headers"] if k.lower() != b"content-type"
                ] + [(b"content-type", b"application/json")]
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": data, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            if gated:
                self.inflight -= 1

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body exceeds {MAX_BODY} bytes"
        await error(413, "payload too large", detail)(scope, receive, send)


def _caller_of(
    request: Request, username: str = "", token: str = "",
    issuers: frozenset[str] | None = None,
) -> Caller:  # fmt: skip
    peer = state_of(request.scope.get("state"))
    return Caller(
        kind="api",
        username=username,
        token=token,
        source_ip=_peer_ip(request.scope),
        identity=operator_identity(peer, issuers),
    )


_FIELD_MESSAGES = {
    "hosts": "hosts must be a non-empty array",
    "script": "script name required (alphanumeric and hyphens only)",
    "args": "args must be an array",
    "async": "async must be a boolean",
    "username": "username must be a string",
    "token": "token must be a string",
}


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """Upstream's 400 ``error`` (and a ``detail``) for FastAPI's validation errors."""
    for e in errors:
        loc = tuple(e.get("loc") or ())
        kind = e.get("type", "")
        if kind == "json_invalid":
            return "invalid JSON body", str(e.get("msg") or "") or None
        if loc == ("body",):
            if kind == "missing":
                return "request body required", None
            return "invalid JSON body", "body must be a JSON object"
        if len(loc) >= 2 and loc[0] == "body" and str(loc[1]) in _FIELD_MESSAGES:
            return _FIELD_MESSAGES[str(loc[1])], str(e.get("msg") or "") or None
    first = errors[0] if errors else {}
    return "invalid request", str(first.get("msg") or "") or None


def _unknown_agent(exc: RegistryError) -> JSONResponse:
    msg = str(exc)
    prefix = "unknown agent(s): "
    if msg.startswith(prefix):
        return error(404, "unknown agent", f"not a registered agent: {msg[len(prefix) :]}")
    return error(400, "invalid host", msg)


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


def _live_spec(base: dict[str, Any], hosts: list[str]) -> dict[str, Any]:
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


def create_app(
    d: Dispatcher, ha: HANode | None = None, *, draining: Callable[[], bool] | None = None,
    operator_issuers: frozenset[str] | None = None,
) -> FastAPI:  # fmt: skip
    """The API application of dispatcher ``d`` (``ha``: the instance's cluster node;
    ``draining``: while true every response closes its connection; ``operator_issuers``:
    see :func:`dispatcher.api.peercert.operator_identity`)."""
    app = FastAPI(
        title="ctrl-exec-api",
        version=__version__,
        description="Remote script execution over mTLS: run, ping, discovery, async status.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        separate_input_output_schemas=False,
        servers=[
            {"url": "http://{host}:{port}", "variables": _SERVER_VARS},
            {"url": "https://{host}:{port}", "variables": _SERVER_VARS},
        ],
    )
    generic = d.cfg.auth_deny_generic
    registry = CollectorRegistry()
    requests = Counter(
        "ctrl_exec_api_requests",
        "API requests by route and outcome",
        ["route", "outcome"],
        registry=registry,
    )
    app.add_middleware(ApiGate, d=d, requests=requests, draining=draining,
                       issuers=operator_issuers)  # fmt: skip

    def caller_of(request: Request, username: str = "", token: str = "") -> Caller:
        return _caller_of(request, username, token, operator_issuers)

    if ha is not None:
        from dispatcher.ha.metrics import ClusterCollector

        registry.register(ClusterCollector(ha.role.snapshot, lambda: ha.role.leader_changes))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _strip_422(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    openapi_version=app.openapi_version,
                    description=app.description,
                    routes=app.routes,
                    tags=_TAGS,
                    servers=app.servers,
                    separate_input_output_schemas=False,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        err, detail = validation_message(list(exc.errors()))
        return error(400, err, detail)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code in (404, 405):
            return error(404, "not found", f"no route for {request.method} {request.url.path}")
        return error(exc.status_code, str(exc.detail))

    async def on_internal(request: Request, exc: Exception) -> Response:
        logfmt.event("api-error", logging.ERROR, path=request.url.path, error=exc)
        return error(500, "internal error", type(exc).__name__)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_internal)

    async def guarded(fn: Callable[[], Awaitable[Response]]) -> Response:
        """Map the operations' exceptions to upstream's error answers."""
        try:
            return await fn()
        except Denied as exc:
            return denial(exc, generic)
        except LockConflict as exc:
            return error(409, "locked", code=4, conflicts=list(exc.conflicts))
        except RegistryError as exc:
            return _unknown_agent(exc)
        except ValueError as exc:  # fan-out limits such as "too many hosts"
            return error(400, "invalid request", str(exc))

    @app.get(
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

    @app.get(
        "/health",
        operation_id="health",
        tags=[TAG_API],
        summary="Liveness; needs no authorisation",
        responses={200: {"model": m.HealthResponse}},
    )
    async def health() -> JSONResponse:
        return JSONResponse({"ok": True, "version": __version__})

    @app.post(
        "/ping",
        operation_id="ping",
        tags=[TAG_RUN],
        summary="Ping agents",
        responses={200: {"model": m.PingResponse}, **BAD_REQUEST, **FORBIDDEN, **NOT_FOUND},
    )
    async def ping(body: m.PingRequest, request: Request) -> Response:
        async def go() -> Response:
            out = await do_ping(d, caller_of(request, body.username, body.token), body.hosts)
            return JSONResponse({"ok": True, "results": out["results"]})

        return await guarded(go)

    @app.post(
        "/run",
        operation_id="run",
        tags=[TAG_RUN],
        summary="Run an allowlisted script on agents (sync, or async with 202)",
        responses={
            200: {"model": m.RunResponse, "description": "Synchronous run finished"},
            202: {"model": m.AsyncSubmitResponse, "description": "Async run submitted"},
            **BAD_REQUEST,
            **FORBIDDEN,
            **NOT_FOUND,
            **CONFLICT,
        },
    )
    async def run(body: m.RunRequest, request: Request) -> Response:
        async def go() -> Response:
            out = await do_run(
                d, caller_of(request, body.username, body.token), body.hosts, body.script,
                body.args, async_=body.async_, record_sync=not body.async_,
            )  # fmt: skip
            if body.async_:
                return JSONResponse(
                    {"ok": True, "reqid": out["reqid"], "async": True, "results": out["results"]},
                    status_code=202,
                )
            return JSONResponse({"ok": True, "reqid": out["reqid"], "results": out["results"]})

        return await guarded(go)

    async def discover(request: Request, body: m.DiscoveryRequest | None) -> Response:
        async def go() -> Response:
            who = caller_of(request, body.username if body else "", body.token if body else "")
            out = await do_discovery(d, who, body.hosts if body else None)
            return JSONResponse({"ok": True, "hosts": out["hosts"]})

        return await guarded(go)

    discovery_doc: dict[str, Any] = {
        "tags": [TAG_RUN],
        "responses": {200: {"model": m.DiscoveryResponse}, **BAD_REQUEST, **FORBIDDEN, **NOT_FOUND},
    }

    @app.get("/discovery", operation_id="discovery_get", summary="Capabilities of every agent",
             **discovery_doc)  # fmt: skip
    async def discovery_get(request: Request) -> Response:
        return await discover(request, None)

    @app.post("/discovery", operation_id="discovery", summary="Capabilities of some agents",
              **discovery_doc)  # fmt: skip
    async def discovery_post(request: Request, body: m.DiscoveryRequest | None = None) -> Response:
        return await discover(request, body)

    @app.get(
        "/status/{reqid}",
        operation_id="status",
        tags=[TAG_STATUS],
        summary="Result of a run (async results fetched from the agents)",
        responses={
            200: {"model": m.StatusResponse},
            404: {**_ERR, "description": "Unknown reqid, or not the submitter's"},
            500: {**_ERR, "description": "cannot read result"},
            **FORBIDDEN,
        },
    )
    async def status(reqid: str, request: Request) -> Response:
        if not REQID_RE.fullmatch(reqid):
            return error(404, "not found", f"no route for GET {request.url.path}")
        token = bearer_token(request.headers.get("authorization"))
        missing = error(404, "not found", f"no result for reqid {reqid}")
        try:
            d.runstore.purge()
            record = await do_status(d, caller_of(request, "", token), reqid)
        except Denied:
            return missing  # upstream answers a refused owner check like an unknown reqid
        except (RunStoreError, OSError) as exc:
            return error(500, "cannot read result", str(exc))
        if record is None:
            return missing
        record = {k: v for k, v in record.items() if k != "submitter"}
        return JSONResponse({"ok": True, **record})

    @app.get("/openapi-live.json", operation_id="openapi_live", tags=[TAG_API],
             summary="The OpenAPI document with registered host names as enums",
             responses={200: {"description": "OpenAPI 3.1 document"}, **FORBIDDEN})  # fmt: skip
    async def openapi_live() -> JSONResponse:
        return JSONResponse(_live_spec(app.openapi(), d.registry.names()))

    cluster_routes.install(app, d, ha, operator_issuers)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


_SERVER_VARS = {"host": {"default": "localhost"}, "port": {"default": "7445"}}
_TAGS = [
    {"name": TAG_API, "description": "Service description, health and specification"},
    {"name": TAG_RUN, "description": "Run, ping and discovery on agents"},
    {"name": TAG_STATUS, "description": "Results of recorded runs"},
    {
        "name": cluster_routes.TAG_CLUSTER,
        "description": "Leader-only actions (pairing decisions, switchover) from any instance",
    },
]
