"""Leader-only API routes: pairing decisions and switchover, callable on every instance.

* ``GET /pairing``: the pending pairing requests (no CSR, no nonce);
* ``POST /pairing/{reqid}/approve`` (``lookup_by``, ``ip``, ``agent_port`` optional) and
  ``POST /pairing/{reqid}/deny`` (``reason`` optional);
* ``POST /cluster/switchover``: the leader resigns and a peer takes over;
* ``GET /cluster/files/{path}?generation=N`` (peers only, not in the OpenAPI document):
  one file of config generation N, for followers that sync (:mod:`dispatcher.ha.sync`).
  Allowed only for a client certificate presenting the cluster's current or previous
  dispatcher serial, verified by the TLS handshake against the dispatcher CA; never
  through the auth hook, never on plain HTTP. 409 when this instance does not run
  generation N (or the file changed since), 404 when the file is not part of it.

The leader does the work itself through :func:`dispatcher.ha.actions.perform` (every write
through the fenced writer under the epoch captured when the action began; the epoch is in
the answer and in every log line). A
follower forwards the request to the leader's ``advertise_url`` (with the caller's body
and ``Authorization`` header; the leader authorises it again) and returns the leader's
answer; when forwarding is impossible it answers 503 ``{"ok":false,"error":"not leader",
"leader":{"instance_id","url"}}``. With the store unreachable every one of them fails at
once with 503 ``cluster unavailable``. A switchover asked of a follower is posted through
the store, which the leader watches, so it needs no forwarding.
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from agent.common import logfmt
from cluster.errors import BackendUnavailable, NotLeader
from dispatcher.api.models import ErrorResponse
from dispatcher.core import Dispatcher
from dispatcher.ha import actions
from dispatcher.ha.errors import ClusterUnavailableError, NotLeaderError
from dispatcher.ha.replication import NotAcknowledged
from dispatcher.operations import Caller, Denied, authorise
from dispatcher.pairing import queue as pq

if TYPE_CHECKING:
    from dispatcher.ha.node import HANode

TAG_CLUSTER = "cluster"
PEER_PREFIX = "/cluster/files/"
FORWARDED_BY = "x-ctrl-exec-forwarded-by"
EPOCH_HEADER = "x-ctrl-exec-epoch"
FORWARD_TIMEOUT = 30.0

ENDPOINTS: list[dict[str, str]] = [
    {"method": "GET", "path": "/pairing"},
    {"method": "POST", "path": "/pairing/{reqid}/approve"},
    {"method": "POST", "path": "/pairing/{reqid}/deny"},
    {"method": "POST", "path": "/cluster/switchover"},
]
ROUTES = frozenset(e["path"] for e in ENDPOINTS)


def route_label(path: str) -> str | None:
    """The route template of a cluster path (for metrics), or None."""
    if path in ROUTES:
        return path
    if path.startswith(PEER_PREFIX):
        return "/cluster/files/{path}"
    if path.startswith("/pairing/"):
        for verb in ("approve", "deny"):
            if path.endswith(f"/{verb}"):
                return f"/pairing/{{reqid}}/{verb}"
    return None


class Credentials(BaseModel):
    username: str = ""
    token: str = ""


class ApproveRequest(Credentials):
    lookup_by: str | None = Field(
        default=None, description="ip or hostname (default: the agent's hint)"
    )
    ip: str | None = Field(default=None, description="address to register (default: queued)")
    agent_port: int | None = Field(
        default=None, description="agent port (default: the reported one, or 7443)"
    )


class DenyRequest(Credentials):
    reason: str = "rejected by operator"


class PairingListResponse(BaseModel):
    ok: bool = True
    leader: str
    epoch: int
    requests: list[dict[str, Any]]


class DecisionResponse(BaseModel):
    ok: bool = True
    reqid: str
    status: str = Field(description="approved or denied")
    leader: str
    epoch: int = Field(description="the epoch the decision was committed under")
    agent: str | None = None
    ip: str | None = None
    port: int | None = None
    lookup_by: str | None = None
    expiry: str | None = None
    dispatcher_serial: str | None = None
    warnings: list[str] = []


class SwitchoverResponse(BaseModel):
    ok: bool = True
    leader: str = Field(description="the leader asked to resign")
    epoch: int
    action: str = Field(description="resigned (this instance led) or requested (through etcd)")


_ERR: dict[str, Any] = {"model": ErrorResponse}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {**_ERR, "description": "not leader (with the leader) or cluster unavailable"}
}


def _error(status: int, err: str, detail: str | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"ok": False, "error": err}
    if detail is not None:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status)


def _peer(request: Request) -> str:
    client = request.scope.get("client")
    return str(client[0]) if client else ""


def _forward_ctx(d: Dispatcher) -> ssl.SSLContext:
    """Client context towards a peer's API (:func:`dispatcher.ha.peer.client_ctx`)."""
    from dispatcher.ha.peer import client_ctx

    return client_ctx(d.cfg)


def forward(
    d: Dispatcher, url: str, method: str, path: str, body: bytes | None,
    headers: dict[str, str], timeout: float = FORWARD_TIMEOUT,
) -> tuple[int, bytes, str]:  # fmt: skip
    """One HTTP request to a peer (blocking; run it in a thread)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, port or 443, timeout=timeout,
                                           context=_forward_ctx(d))  # fmt: skip
    else:
        conn = http.client.HTTPConnection(host, port or 80, timeout=timeout)
    try:
        hdrs = dict(headers)
        if body is not None:
            hdrs["Content-Type"] = "application/json"
        conn.request(method, parts.path.rstrip("/") + path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("content-type") or "application/json"
    finally:
        conn.close()


def install(
    app: FastAPI, d: Dispatcher, ha: HANode | None, issuers: frozenset[str] | None = None
) -> None:
    """Add the cluster routes to the API app (present even without a node, for the spec)."""

    def caller(request: Request, creds: Credentials | None) -> Caller:
        from dispatcher.api.peercert import operator_identity, state_of

        peer = state_of(request.scope.get("state"))
        auth = request.headers.get("authorization") or ""
        token = creds.token if creds and creds.token else ""
        if not token and auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
        return Caller(kind="api", username=creds.username if creds else "", token=token,
                      source_ip=_peer(request),
                      identity=operator_identity(peer, issuers))  # fmt: skip

    def unavailable(detail: str) -> JSONResponse:
        return _error(503, "cluster unavailable", detail)

    def not_leader(detail: str | None = None, leader_id: str | None = None,
                   url: str | None = None) -> JSONResponse:  # fmt: skip
        return _error(503, "not leader", detail,
                      leader={"instance_id": leader_id, "url": url} if leader_id else None)  # fmt: skip

    async def leader_only(
        request: Request, action: str, body: BaseModel | None, local: Any,
        reqid: str = "",
    ) -> Response:  # fmt: skip
        """Authorise, then do ``local()`` on the leader or forward to it."""
        if ha is None:
            return unavailable("this process runs no cluster node")
        if not ha.health.ok:
            return unavailable(ha.health.error or "coordination store unreachable")
        creds = body if isinstance(body, Credentials) else None
        try:
            await authorise(d, caller(request, creds), action, reqid=reqid)
        except Denied as exc:
            if d.cfg.auth_deny_generic:
                return _error(403, "forbidden")
            return _error(403, exc.reason, code=exc.code)
        forwarded_by = request.headers.get(FORWARDED_BY)
        if ha.is_leader():
            sent_epoch = request.headers.get(EPOCH_HEADER, "")
            epoch = ha.writer.epoch()
            if sent_epoch.isdigit() and epoch is not None and int(sent_epoch) > epoch:
                return not_leader(
                    f"the forwarding instance saw epoch {sent_epoch}, newer than {epoch}"
                )
            result: Response = await local()
            return result
        if forwarded_by:  # never forward twice: the views of the two instances differ
            lid, url = ha.leader_hint()
            return not_leader(f"forwarded by {forwarded_by} to an instance that does not lead",
                              lid, url)  # fmt: skip
        try:
            found = await asyncio.to_thread(ha.leader_endpoint)
        except BackendUnavailable as exc:
            ha.health.mark_failed(exc)
            return unavailable(str(exc))
        if found is None:
            return not_leader("no leader elected right now")
        info, url = found
        if info.instance_id == ha.instance_id:  # elected meanwhile: ask again
            return not_leader("leadership is changing", info.instance_id, url)
        if not url:
            return not_leader("the leader has no advertise_url", info.instance_id, None)
        payload = body.model_dump_json(exclude_none=True).encode() if body is not None else None
        headers = {FORWARDED_BY: ha.instance_id, EPOCH_HEADER: str(info.epoch)}
        if request.headers.get("authorization"):
            headers["Authorization"] = request.headers["authorization"]
        try:
            status, raw, ctype = await asyncio.to_thread(
                forward, d, url, request.method, request.url.path, payload, headers
            )
        except (OSError, http.client.HTTPException) as exc:
            logfmt.event("cluster-forward", path=request.url.path, leader=info.instance_id,
                         url=url, result="error", error=exc)  # fmt: skip
            return not_leader(f"cannot reach the leader: {exc}", info.instance_id, url)
        logfmt.event("cluster-forward", path=request.url.path, leader=info.instance_id, url=url,
                     result=status, epoch=info.epoch)  # fmt: skip
        return Response(raw, status_code=status, media_type=ctype.split(";")[0],
                        headers={"X-Ctrl-Exec-Served-By": info.instance_id})  # fmt: skip

    def decision_errors(exc: Exception) -> JSONResponse:
        cause = exc.__context__ if isinstance(exc, pq.PairingQueueError) else exc
        if isinstance(cause, ClusterUnavailableError):
            return unavailable(str(cause))
        if isinstance(cause, NotLeaderError | NotLeader):
            lid, url = ha.leader_hint() if ha is not None else (None, None)
            return not_leader(str(cause), lid, url)
        if isinstance(exc, NotAcknowledged):
            return _error(503, "not acknowledged", str(exc))
        if isinstance(exc, pq.NoSuchRequest):
            return _error(404, "no such request", str(exc))
        if isinstance(exc, pq.PairingQueueError):
            status = 409 if "already been decided" in str(exc) else 400
            return _error(status, "pairing refused", str(exc))
        raise exc

    @app.get(
        "/pairing", operation_id="pairing_list", tags=[TAG_CLUSTER],
        summary="Pending pairing requests (leader-only; forwarded by followers)",
        responses={200: {"model": PairingListResponse}, **UNAVAILABLE},
    )  # fmt: skip
    async def pairing_list(request: Request) -> Response:
        async def local() -> Response:
            assert ha is not None
            try:
                res = await asyncio.to_thread(actions.perform, d, "list-requests")
            except (NotLeaderError, ClusterUnavailableError) as exc:
                return decision_errors(exc)
            return JSONResponse({"ok": True, "leader": ha.instance_id, "epoch": res.epoch,
                                 "requests": res.data})  # fmt: skip

        return await leader_only(request, "pairing", None, local)

    @app.post(
        "/pairing/{reqid}/approve", operation_id="pairing_approve", tags=[TAG_CLUSTER],
        summary="Approve a pairing request: sign, register, deliver (leader-only)",
        responses={200: {"model": DecisionResponse}, 404: {**_ERR, "description": "no such request"},
                   409: {**_ERR, "description": "already decided"}, **UNAVAILABLE},
    )  # fmt: skip
    async def pairing_approve(
        reqid: str, request: Request, body: ApproveRequest | None = None
    ) -> Response:
        b = body or ApproveRequest()

        async def local() -> Response:
            assert ha is not None
            args = {"reqid": reqid, "lookup_by": b.lookup_by, "ip": b.ip,
                    "agent_port": b.agent_port}  # fmt: skip
            try:
                res = await asyncio.to_thread(actions.perform, d, "approve", args)
            except (pq.PairingQueueError, NotLeaderError, ClusterUnavailableError,
                    NotAcknowledged) as exc:  # fmt: skip
                return decision_errors(exc)
            doc = res.data
            logfmt.event("pair-approve-api", reqid=reqid, agent=doc["hostname"],
                         epoch=res.epoch, instance=ha.instance_id)  # fmt: skip
            return JSONResponse({
                "ok": True, "reqid": reqid, "status": "approved", "leader": ha.instance_id,
                "epoch": res.epoch, "agent": doc["hostname"], "ip": doc["ip"],
                "port": doc["port"], "lookup_by": doc["lookup_by"], "expiry": doc["expiry"],
                "dispatcher_serial": doc["dispatcher_serial"], "warnings": doc["warnings"],
            })  # fmt: skip

        return await leader_only(request, "pairing", b, local, reqid)

    @app.post(
        "/pairing/{reqid}/deny", operation_id="pairing_deny", tags=[TAG_CLUSTER],
        summary="Deny a pairing request (leader-only)",
        responses={200: {"model": DecisionResponse}, 404: {**_ERR, "description": "no such request"},
                   409: {**_ERR, "description": "already decided"}, **UNAVAILABLE},
    )  # fmt: skip
    async def pairing_deny(
        reqid: str, request: Request, body: DenyRequest | None = None
    ) -> Response:
        b = body or DenyRequest()

        async def local() -> Response:
            assert ha is not None
            args = {"reqid": reqid, "reason": b.reason}
            try:
                res = await asyncio.to_thread(actions.perform, d, "deny", args)
            except (pq.PairingQueueError, NotLeaderError, ClusterUnavailableError,
                    NotAcknowledged) as exc:  # fmt: skip
                return decision_errors(exc)
            return JSONResponse({"ok": True, "reqid": reqid, "status": "denied",
                                 "leader": ha.instance_id, "epoch": res.epoch})  # fmt: skip

        return await leader_only(request, "pairing", b, local, reqid)

    @app.post(
        "/cluster/switchover", operation_id="cluster_switchover", tags=[TAG_CLUSTER],
        summary="The leader resigns; a peer takes over",
        responses={200: {"model": SwitchoverResponse}, **UNAVAILABLE},
    )  # fmt: skip
    async def cluster_switchover(request: Request, body: Credentials | None = None) -> Response:
        if ha is None:
            return unavailable("this process runs no cluster node")
        if not ha.health.ok:
            return unavailable(ha.health.error or "coordination store unreachable")
        try:
            await authorise(d, caller(request, body), "cluster")
        except Denied as exc:
            if d.cfg.auth_deny_generic:
                return _error(403, "forbidden")
            return _error(403, exc.reason, code=exc.code)
        by = f"api:{_peer(request)}@{ha.instance_id}"
        try:
            out = await asyncio.to_thread(ha.request_switchover, by)
        except BackendUnavailable as exc:
            ha.health.mark_failed(exc)
            return unavailable(str(exc))
        except LookupError as exc:
            return not_leader(str(exc))
        return JSONResponse({"ok": True, **out})

    @app.get("/cluster/files/{path:path}", include_in_schema=False)
    async def cluster_file(path: str, request: Request, generation: int = -1) -> Response:
        from agent.common.serial import serial_to_hex
        from dispatcher.api.peercert import state_of

        sync = ha.sync if ha is not None else None
        if sync is None:
            return _error(404, "not found", "this instance publishes no generations")
        peer = state_of(request.scope.get("state"))
        if not peer["tls_version"]:
            return _error(403, "forbidden", "peer routes need TLS")
        serial = serial_to_hex(peer["peer_serial"] or "")
        allowed = await asyncio.to_thread(sync.peer_serials)
        if not serial or serial not in allowed:
            logfmt.event("peer-denied", path=request.url.path, peer=_peer(request),
                         serial=serial or "-", reason="not a dispatcher serial of the cluster")  # fmt: skip
            return _error(403, "forbidden", "a dispatcher certificate of this cluster is required")
        status, data, entry = await asyncio.to_thread(sync.serve, path, generation)
        if status != 200 or entry is None or not isinstance(data, bytes):
            err = "conflict" if status == 409 else "not found"
            return _error(status, err, str(data))
        return Response(data, media_type="application/octet-stream", headers={
            "X-Ctrl-Exec-Sha256": entry.sha256, "X-Ctrl-Exec-Mode": format(entry.mode, "o"),
            "X-Ctrl-Exec-Generation": str(generation),
        })  # fmt: skip
