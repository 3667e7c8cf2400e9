"""The HTTP API of one dispatcher instance (upstream spec section 9) on FastAPI.

Routes, bodies, status codes and error shapes are upstream's. Every request first goes
through :class:`~dispatcher.api.gate.ApiGate`, a plain ASGI middleware that does what
upstream's request parser and pre-route check do: at most 32 header lines (431), bodies
up to 1 MiB (413), one ``api-request`` log line, and the ``api`` auth hook call, which
covers every route except ``/health`` and ``/metrics`` (upstream also gates ``/health``;
its own docs say it should not, DESIGN.md section 2) and the peers' ``/cluster/files/``
(authorised by certificate serial). Each route then authorises its own action through
:mod:`dispatcher.operations`.

The routes are :class:`~fastapi.APIRouter` objects in :mod:`dispatcher.api.routes`; they
take the application's state (:class:`~dispatcher.api.deps.ApiState` on
``app.state.api``) and the caller through the dependencies of :mod:`dispatcher.api.deps`.
The operator identity of a TLS client certificate from an operator CA (CN, serial,
issuer fingerprint: :mod:`dispatcher.api.operatorcerts`) becomes the caller's username
and ``Caller.identity``, reaches the auth hook and the run records, and is on every log
line of the request; any other certificate is refused outside the peer routes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry, Counter
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.version import __version__
from dispatcher.api import errors, opsmetrics
from dispatcher.api.deps import ApiState
from dispatcher.api.gate import ApiGate
from dispatcher.api.operatorcerts import OperatorTrust
from dispatcher.api.pinmetrics import PinCollector
from dispatcher.api.routes import (
    cluster_control,
    cluster_files,
    history,
    pairing,
    runs,
    service,
    spec,
)
from dispatcher.core import Dispatcher

if TYPE_CHECKING:
    from dispatcher.ha.node import HANode

_SERVER_VARS = {"host": {"default": "localhost"}, "port": {"default": "7445"}}


class ApiApp(FastAPI):
    """FastAPI with this API's OpenAPI document (:func:`dispatcher.api.routes.spec.document`)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = spec.document(self)
        return self.openapi_schema


def create_app(
    d: Dispatcher, ha: HANode | None = None, *, draining: Callable[[], bool] | None = None,
    operators: OperatorTrust | None = None,
) -> FastAPI:  # fmt: skip
    """The API application of dispatcher ``d`` (``ha``: the instance's cluster node;
    ``draining``: while true every response closes its connection; ``operators``: the
    operator CAs, by default as the config says, :class:`OperatorTrust`)."""
    operators = operators or OperatorTrust.from_config(d.cfg)
    app = ApiApp(
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
    registry = CollectorRegistry()
    requests = Counter("ctrl_exec_api_requests", "API requests by route and outcome",
                       ["route", "outcome"], registry=registry)  # fmt: skip
    registry.register(PinCollector())
    sync = ha.sync if ha is not None else None
    opsmetrics.install(registry, d, sync.restart_pending if sync is not None else None)
    if ha is not None:
        from dispatcher.ha.metrics import ClusterCollector

        registry.register(ClusterCollector(ha.role.snapshot, lambda: ha.role.leader_changes,
                                           ha.records.rejections.counts, ha.members,
                                           sync.sync_view if sync is not None else None))  # fmt: skip
    app.state.api = ApiState(d=d, ha=ha, operators=operators, registry=registry)
    app.add_middleware(ApiGate, d=d, requests=requests, draining=draining,
                       operators=operators, peer_serials=_peer_serials(ha))  # fmt: skip
    app.add_exception_handler(RequestValidationError, errors.on_validation)
    app.add_exception_handler(StarletteHTTPException, errors.on_http)
    app.add_exception_handler(errors.Answer, errors.on_answer)
    app.add_exception_handler(Exception, errors.on_internal)
    # in this order: the order of the paths in the OpenAPI document
    add_routes(app, service.router, runs.router, history.router, spec.router, pairing.router,
               cluster_control.router, cluster_files.router)  # fmt: skip
    return app


def _peer_serials(ha: HANode | None) -> Callable[[], set[str]]:
    """The cluster's dispatcher serials (peers forward to the leader with that cert)."""
    sync = ha.sync if ha is not None else None
    if sync is None:
        return set
    return sync.peer_serials


def add_routes(app: FastAPI, *routers: APIRouter) -> None:
    """Make the routes of ``routers`` routes of ``app`` itself.

    Not ``app.include_router``: since FastAPI 0.137 an included router stays a branch of
    the route tree, matched on every request (twice: to match, then to handle), so that
    it can apply a prefix, tags or dependencies of the inclusion; these routers have none.
    Here that cost about 50 Python calls (some 20 us) per request. The routers build
    their routes themselves, so ``app.dependency_overrides`` does not reach them
    (nothing here uses it).
    """
    for router in routers:
        app.router.routes.extend(router.routes)
