"""The pre-route gate of every API request: what upstream's request parser and pre-route
check do, as a plain ASGI middleware in front of FastAPI.

* at most :data:`MAX_HEADERS` header lines (431) and :data:`MAX_BODY` bytes of body
  (413), a Content-Length that is a number (400), JSON nested at most
  ``MAX_JSON_DEPTH`` deep (400, checked before anything parses it; off the event loop
  for a large body);
* operators are not agents: a client certificate names an operator only when the operator
  CA (or ``api_client_ca``) issued it (:class:`~dispatcher.api.operatorcerts.OperatorTrust`);
  any other verified certificate (an agent's) is refused with 403 and logged with its CN
  and serial (``api-refused``), except on the peer routes and for the cluster's own
  dispatcher serials (a peer forwarding to the leader); with ``api_require_client_cert``
  a request without an operator certificate is refused;
* every log line of a request carries its ``REQID`` (a new one, or, for a request a peer
  forwarded, the one its assertion names: the follower's), answered as the
  ``X-Ctrl-Exec-Reqid`` header; a run or ping the request starts has that reqid;
* every log line of a request with an operator certificate carries ``IDENTITY`` (its CN)
  and ``CERT_SERIAL``; its CN is the username (a different body ``username`` is ignored,
  logged as ``username-ignored``);
* one ``api-request`` log line (with ``via`` the load balancer on the PROXY v2 port);
* the ``api`` auth hook call (with ``username``/``token`` of a JSON body, or the bearer
  token), and at most ``api_max_children`` such requests at once (503 ``busy``), for
  every route except ``/health``, ``/metrics`` and the peers' ``/cluster/files/``;
* the body is handed on as JSON whatever its Content-Type says (upstream parses any body
  as JSON);
* ``ctrl_exec_api_requests_total{route,outcome}``, and ``Connection: close`` on every
  answer while the instance drains.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.common import logfmt
from agent.common.serial import serial_to_hex
from agent.common.wire import MAX_JSON_DEPTH, json_too_deep
from dispatcher.api.deps import OPERATOR_KEY, api_caller, bearer_token, peer_ip
from dispatcher.api.errors import denial, error
from dispatcher.api.operatorcerts import CertIdentity, OperatorTrust, describe
from dispatcher.api.peercert import state_of
from dispatcher.api.routes import PEER_PREFIXES, route_label
from dispatcher.core import Dispatcher
from dispatcher.ha.forwarding import HEADER, claimed_reqid
from dispatcher.operations import Denied, authorise
from dispatcher.reqid import new_reqid

MAX_BODY = 1024 * 1024
MAX_HEADERS = 32
DEPTH_SCAN_INLINE = 64 * 1024  # bodies larger than this are depth-checked in a thread
UNGATED = frozenset({"/health", "/metrics"})
REQID_HEADER = b"x-ctrl-exec-reqid"
FORWARDED_BY = b"x-ctrl-exec-forwarded-by"  # leadergate.FORWARDED_BY (not imported: FastAPI)


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


class ApiGate:
    """Pre-route checks of every request: limits, ``api-request`` log, ``api`` auth."""

    def __init__(
        self, app: ASGIApp, d: Dispatcher, requests: Counter,
        draining: Callable[[], bool] | None = None, operators: OperatorTrust | None = None,
        peer_serials: Callable[[], set[str]] = set,
    ) -> None:  # fmt: skip
        self.app = app
        self.d = d
        self.requests = requests
        self.draining = draining or (lambda: False)
        self.operators = operators or OperatorTrust([])
        self.peer_serials = peer_serials
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]
        reqid = [new_reqid()]

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                message = dict(message)
                message["headers"] = [*message.get("headers", []),
                                      (REQID_HEADER, reqid[0].encode())]  # fmt: skip
                if self.draining():  # the client reconnects, through the balancer, elsewhere
                    message = dict(message)
                    message["headers"] = [
                        *(h for h in message.get("headers", []) if h[0].lower() != b"connection"),
                        (b"connection", b"close"),
                    ]
            await send(message)

        try:
            await self._gate(scope, receive, counting_send, reqid)
        finally:
            self.requests.labels(route_label(scope["path"]), outcome_label(status[0])).inc()

    async def _gate(self, scope: Scope, receive: Receive, send: Send, reqid: list[str]) -> None:
        state = scope.setdefault("state", {})
        der = state_of(state).get("peer_cert_der")
        cert = self.operators.identify(der) if der else None
        if cert is None:
            # a peer forwarding to the leader: its reqid, and its name until the assertion
            # is checked (then the lines name the operator it asserts: leadergate)
            by = _header(scope, FORWARDED_BY)
            claimed = ""
            if by and await self._from_peer(state, der):
                claimed = claimed_reqid(_header(scope, HEADER.encode()) or "")
            reqid[0] = claimed or reqid[0]
            with logfmt.request(reqid[0], **({"forwarded_by": by} if claimed else {})):
                await self._checked(scope, receive, send, der, None)
            return
        state[OPERATOR_KEY] = cert
        with logfmt.request(reqid[0], identity=cert.cn, cert_serial=cert.serial):
            await self._checked(scope, receive, send, der, cert)

    async def _from_peer(self, state: dict[str, object], der: bytes | None) -> bool:
        """Whether a request may name its reqid (a forwarding peer's): on TLS only with a
        dispatcher serial of the cluster; on a plain-HTTP API (loopback set-ups) always."""
        if der is None:
            return not state_of(state).get("tls_version")
        serial = serial_to_hex(describe(der)[1])
        return bool(serial) and serial in await asyncio.to_thread(self.peer_serials)

    async def _checked(
        self, scope: Scope, receive: Receive, send: Send, der: bytes | None,
        cert: CertIdentity | None,
    ) -> None:  # fmt: skip
        method, path = scope["method"], scope["path"]
        state = scope["state"]
        length_hdr = _header(scope, b"content-length")
        via = state.get("proxy_peer")  # the load balancer, on the PROXY v2 port only
        logfmt.event(
            "api-request", method=method, path=path, peer=peer_ip(scope),
            len=length_hdr or 0, **({"via": via} if via else {}),
        )  # fmt: skip
        if der and cert is None and not await self._foreign_cert(scope, der, receive, send):
            return
        if not der and self.d.cfg.api_require_client_cert and path not in UNGATED:
            logfmt.event("api-refused", logfmt.WARNING, path=path, peer=peer_ip(scope),
                         reason="no client certificate")  # fmt: skip
            await error(403, "forbidden", "an operator certificate is required")(
                scope, receive, send
            )
            return
        data = await self._read_body(scope, length_hdr, receive, send)
        if data is None:
            return
        # peer routes authenticate the dispatcher certificate themselves, never the hook
        if path in UNGATED or path.startswith(PEER_PREFIXES):
            await self._pass_on(scope, data, receive, send)
            return
        if self.inflight >= max(1, self.d.cfg.api_max_children):
            await error(503, "busy", "too many concurrent API requests")(scope, receive, send)
            return
        self.inflight += 1
        try:
            if await self._authorised(scope, data, cert, receive, send):
                await self._pass_on(scope, data, receive, send)
        finally:
            self.inflight -= 1

    async def _foreign_cert(self, scope: Scope, der: bytes, receive: Receive, send: Send) -> bool:
        """A verified certificate that no operator CA issued (an agent's, a peer's): on
        the peer routes, or with a dispatcher serial of the cluster (a peer forwarding to
        the leader), it passes naming no operator; anything else is refused (403)."""
        path = scope["path"]
        if path.startswith(PEER_PREFIXES):
            return True
        cn, serial, issuer = describe(der)
        if serial_to_hex(serial) in await asyncio.to_thread(self.peer_serials):
            return True
        logfmt.event(
            "api-refused", logfmt.WARNING, path=path, peer=peer_ip(scope),
            reason="not an operator certificate", cert_cn=cn, cert_serial=serial, issuer=issuer,
        )  # fmt: skip
        detail = "the client certificate is not an operator certificate"
        await error(403, "forbidden", detail)(scope, receive, send)
        return False

    async def _read_body(
        self, scope: Scope, length_hdr: str | None, receive: Receive, send: Send
    ) -> bytes | None:
        """The whole body within the limits; None when answered (or the client left)."""
        if len(scope["headers"]) > MAX_HEADERS:
            detail = f"more than {MAX_HEADERS} header lines"
            await error(431, "request header fields too large", detail)(scope, receive, send)
            return None
        try:
            declared = int(length_hdr) if length_hdr is not None else 0
        except ValueError:
            await error(400, "invalid Content-Length")(scope, receive, send)
            return None
        if declared > MAX_BODY:
            await self._too_large(scope, receive, send)
            return None
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = bool(message.get("more_body"))
            if len(body) > MAX_BODY:
                await self._too_large(scope, receive, send)
                return None
        data = bytes(body)
        if len(data) <= DEPTH_SCAN_INLINE:
            deep = json_too_deep(data)
        else:
            deep = await asyncio.to_thread(json_too_deep, data)
        if deep:
            detail = f"JSON nested deeper than {MAX_JSON_DEPTH}"
            await error(400, "invalid request", detail)(scope, receive, send)
            return None
        return data

    async def _authorised(
        self, scope: Scope, data: bytes, cert: CertIdentity | None, receive: Receive, send: Send
    ) -> bool:
        """The ``api`` auth hook call; False when it refused (the 403 is sent)."""
        user, token = _body_fields(data)
        if cert is not None and user and user != cert.cn:
            logfmt.event("username-ignored", logfmt.WARNING, body_username=user,
                         reason="the operator certificate names the user")  # fmt: skip
        token = token or bearer_token(_header(scope, b"authorization"))
        caller = api_caller(user, token, peer_ip(scope), cert)
        try:
            await authorise(self.d, caller, "api")
        except Denied as exc:
            await denial(exc, self.d.cfg.auth_deny_generic)(scope, receive, send)
            return False
        return True

    async def _pass_on(self, scope: Scope, data: bytes, receive: Receive, send: Send) -> None:
        """Call the application with the body already read, as JSON."""
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

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body exceeds {MAX_BODY} bytes"
        await error(413, "payload too large", detail)(scope, receive, send)
