"""FastAPI dependencies of the API routes: the application's state and who calls.

:func:`~dispatcher.api.app.create_app` puts one :class:`ApiState` on ``app.state.api``;
routes take what they need from it through the ``*Dep`` annotations below instead of
closing over it. A route that acts for a caller takes one :class:`ApiCall` (state and
caller together: each dependency FastAPI resolves costs some microseconds per request);
the cluster routes take its subclass :class:`~dispatcher.api.leadergate.ClusterCall`.
Every dependency is ``async``: FastAPI runs a plain ``def`` dependency in a thread pool,
a thread hop per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Self

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry
from starlette.types import Scope

from dispatcher.api.operatorcerts import CertIdentity, OperatorTrust
from dispatcher.core import Dispatcher
from dispatcher.operations import Caller

#: ``scope["state"]`` key where the gate leaves the request's operator identity
OPERATOR_KEY = "operator"

if TYPE_CHECKING:
    from dispatcher.ha.node import HANode


@dataclass(frozen=True)
class ApiState:
    """What the routes of one API application share (``app.state.api``)."""

    d: Dispatcher
    ha: HANode | None  # the instance's cluster node; None without one (tests, spec dump)
    operators: OperatorTrust  # which client certificates name an operator
    registry: CollectorRegistry  # what GET /metrics exposes


def bearer_token(value: str | None) -> str:
    """The token of an ``Authorization: Bearer ...`` header value ("" for none)."""
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return ""


def peer_ip(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


@dataclass(frozen=True)
class ApiCall:
    """One request to a route: the application's state, and who calls as the connection
    tells (address, certificate identity, ``Authorization`` header)."""

    request: Request
    state: ApiState
    source_ip: str
    cert: CertIdentity | None  # the operator certificate's identity (the gate's), or None

    @classmethod
    def of(cls, request: Request) -> Self:
        state: ApiState = request.app.state.api
        return cls(request=request, state=state, source_ip=peer_ip(request.scope),
                   cert=operator_of(request.scope))  # fmt: skip

    @property
    def identity(self) -> str:
        """The operator's CN ("" without an operator certificate)."""
        return self.cert.cn if self.cert else ""

    @property
    def d(self) -> Dispatcher:
        return self.state.d

    @property
    def bearer(self) -> str:
        """The token of an ``Authorization: Bearer`` header ("" for none)."""
        return bearer_token(self.request.headers.get("authorization"))

    def caller(self, username: str = "", token: str = "") -> Caller:
        """The :class:`Caller` the operations authorise, with the body's credentials (the
        username is the certificate's CN when there is one: the gate logged a different
        body username)."""
        return api_caller(username, token, self.source_ip, self.cert)


def operator_of(scope: Scope) -> CertIdentity | None:
    state = scope.get("state")
    found = state.get(OPERATOR_KEY) if isinstance(state, dict) else None
    return found if isinstance(found, CertIdentity) else None


def api_caller(username: str, token: str, source_ip: str, cert: CertIdentity | None) -> Caller:
    """An API :class:`Caller`; with an operator certificate its CN is the username."""
    if cert is None:
        return Caller(kind="api", username=username, token=token, source_ip=source_ip)
    return Caller(kind="api", username=cert.cn, token=token, source_ip=source_ip,
                  identity=cert.cn, cert_serial=cert.serial,
                  issuer_fingerprint=cert.issuer_fingerprint)  # fmt: skip


async def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


async def dispatcher(request: Request) -> Dispatcher:
    d: Dispatcher = request.app.state.api.d
    return d


async def api_call(request: Request) -> ApiCall:
    return ApiCall.of(request)


StateDep = Annotated[ApiState, Depends(api_state)]
DispatcherDep = Annotated[Dispatcher, Depends(dispatcher)]
CallDep = Annotated[ApiCall, Depends(api_call)]
