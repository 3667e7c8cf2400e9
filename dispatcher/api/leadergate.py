"""The gates of the cluster routes: store reachable, caller authorised, this instance leads.

A cluster route takes a :class:`ClusterCall` (the dependency :data:`ClusterCallDep`, an
:class:`~dispatcher.api.deps.ApiCall` with gates) and passes the gates in this order,
after FastAPI validated the body:

* :meth:`ClusterCall.node`: with the store unreachable (or no cluster node in this
  process) the request fails at once with 503 ``cluster unavailable``;
* :meth:`ClusterCall.authorise`: the route's action through the auth hook, with the
  body's ``username``/``token`` (the token also from ``Authorization: Bearer``); 403;
* :meth:`ClusterCall.lead`, the leader gate of leader-only actions: on the leader it
  returns the node and the route does the work itself (through
  :func:`dispatcher.ha.actions.perform`); a follower forwards the request to the
  leader's ``advertise_url`` and the leader's answer is returned. The follower checks
  first that the leader's TLS certificate carries a dispatcher serial of the cluster
  (an agent certificate behind a forged member record gets nothing), and never forwards
  the operator's credentials: no ``Authorization`` header, no body ``token``, but a
  signed assertion of who asked (:mod:`dispatcher.ha.forwarding`). The leader accepts a
  forwarded request only with a valid assertion (and, on TLS, from a peer presenting a
  dispatcher serial), then authorises the asserted operator again (its auth hook runs,
  without the token). When forwarding is
  impossible the answer is 503 ``{"ok":false,"error":"not leader","leader":
  {"instance_id","url"}}``. A request is never forwarded twice, and a leader refuses a
  forwarded request that saw a newer epoch than its own.

A gate that ends the request raises :class:`~dispatcher.api.errors.Answer` with the
response. The checks run in the route, not as dependencies that raise, so a bad body
still answers 400 before any of them.
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response

from agent.common import logfmt
from agent.common.serial import serial_to_hex
from cluster.errors import BackendUnavailable, ClusterError
from dispatcher.api.deps import ApiCall
from dispatcher.api.errors import Answer, denial, error
from dispatcher.api.models import Credentials
from dispatcher.api.peercert import state_of
from dispatcher.core import Dispatcher
from dispatcher.ha import forwarding
from dispatcher.operations import Caller, Denied, authorise

if TYPE_CHECKING:
    from cluster.backend import LeaderInfo
    from dispatcher.ha.node import HANode

FORWARDED_BY = "x-ctrl-exec-forwarded-by"
EPOCH_HEADER = "x-ctrl-exec-epoch"
FORWARD_TIMEOUT = 30.0
_nonces = forwarding.Nonces()  # assertions this process accepted (replays are refused)


def unavailable(detail: str) -> JSONResponse:
    return error(503, "cluster unavailable", detail)


def not_leader(detail: str | None = None, leader_id: str | None = None,
               url: str | None = None) -> JSONResponse:  # fmt: skip
    return error(503, "not leader", detail,
                 leader={"instance_id": leader_id, "url": url} if leader_id else None)  # fmt: skip


def _forward_ctx(d: Dispatcher) -> ssl.SSLContext:
    """Client context towards a peer's API (:func:`dispatcher.ha.peer.client_ctx`)."""
    from dispatcher.ha.peer import client_ctx

    return client_ctx(d.cfg)


def forward(
    d: Dispatcher, url: str, method: str, path: str, body: bytes | None,
    headers: dict[str, str], timeout: float = FORWARD_TIMEOUT,
    allowed: set[str] | None = None,
) -> tuple[int, bytes, str]:  # fmt: skip
    """One HTTP request to a peer (blocking; run it in a thread). With ``allowed``, the
    peer's certificate must carry one of these serials (:class:`~dispatcher.ha.peer.
    PeerRefused` otherwise, before anything is sent)."""
    from dispatcher.ha import peer

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, port or 443, timeout=timeout,
                                           context=_forward_ctx(d))  # fmt: skip
    else:
        conn = http.client.HTTPConnection(host, port or 80, timeout=timeout)
    try:
        if allowed is not None:
            if parts.scheme != "https":
                raise peer.PeerRefused(f"{url}: no TLS, the leader's identity cannot be checked")
            conn.connect()
            peer.check_serial(conn, allowed, url, "forward")
        hdrs = dict(headers)
        if body is not None:
            hdrs["Content-Type"] = "application/json"
        conn.request(method, parts.path.rstrip("/") + path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("content-type") or "application/json"
    finally:
        conn.close()


@dataclass(frozen=True)
class ClusterCall(ApiCall):
    """One request to a cluster route, with its gates."""

    def node(self) -> HANode:
        """The cluster node while its store answers; else 503 ``cluster unavailable``."""
        ha = self.state.ha
        if ha is None:
            raise Answer(unavailable("this process runs no cluster node"))
        if not ha.health.ok:
            raise Answer(unavailable(ha.health.error or "coordination store unreachable"))
        return ha

    async def authorise(self, action: str, creds: Credentials | None, reqid: str = "") -> None:
        """``action`` through the auth hook; else 403 (generic with ``auth_deny_generic``)."""
        token = (creds.token if creds else "") or self.bearer
        caller = self.caller(creds.username if creds else "", token)
        try:
            await authorise(self.d, caller, action, reqid=reqid)
        except Denied as exc:
            raise Answer(denial(exc, self.d.cfg.auth_deny_generic)) from None

    async def lead(self, action: str, body: Credentials | None, reqid: str = "") -> HANode:
        """The leader gate: the node when the work is to be done here; otherwise the
        request ends with the leader's answer (forwarded) or 503 ``not leader``."""
        node = self.node()
        forwarded_by = self.request.headers.get(FORWARDED_BY)
        if forwarded_by:  # a peer's assertion of who asked, never credentials
            caller = await self._asserted(node)
            # the rest of the request's lines name the asserted operator (the gate's
            # request context, which ends with the request, drops this too)
            logfmt.push_context(identity=caller.identity, cert_serial=caller.cert_serial)
            logfmt.event("forward-accepted", by=forwarded_by, reqid=logfmt.current_reqid())
            try:
                await authorise(self.d, caller, action, reqid=reqid)
            except Denied as exc:
                raise Answer(denial(exc, self.d.cfg.auth_deny_generic)) from None
        else:
            await self.authorise(action, body, reqid)
        if node.is_leader():
            sent_epoch = self.request.headers.get(EPOCH_HEADER, "")
            epoch = node.writer.epoch()
            if sent_epoch.isdigit() and epoch is not None and int(sent_epoch) > epoch:
                raise Answer(
                    not_leader(
                        f"the forwarding instance saw epoch {sent_epoch}, newer than {epoch}"
                    )
                )
            return node
        if forwarded_by:  # never forward twice: the views of the two instances differ
            lid, url = node.leader_hint()
            raise Answer(not_leader(f"forwarded by {forwarded_by} to an instance that does not lead",
                                    lid, url))  # fmt: skip
        raise Answer(await self._to_leader(node, body))

    async def _asserted(self, node: HANode) -> Caller:
        """The operator a forwarded request asserts (403 unless the assertion holds and,
        on TLS, the forwarding peer presents a dispatcher serial of the cluster)."""
        request = self.request
        peer = state_of(request.scope.get("state"))
        reason = ""
        if peer["tls_version"]:
            serial = serial_to_hex(peer["peer_serial"] or "")
            allowed = await asyncio.to_thread(_serials, node, False)
            if not serial or serial not in allowed:
                reason = f"forwarded by a peer without a dispatcher serial ({serial or '-'})"
        if not reason:
            try:
                who = forwarding.check(
                    node.records.signer, request.headers.get(forwarding.HEADER, ""),
                    method=request.method, path=request.url.path,
                    body=await request.body(), nonces=_nonces,
                )  # fmt: skip
            except forwarding.AssertionRefused as exc:
                reason = str(exc)
        if reason:
            logfmt.event("forward-refused", logfmt.WARNING, path=request.url.path,
                         peer=self.source_ip, by=request.headers.get(FORWARDED_BY, ""),
                         reason=reason)  # fmt: skip
            raise Answer(error(403, "forbidden", f"forwarded request refused: {reason}"))
        return Caller(kind="api", username=who.cn or who.username, token="", source_ip=who.ip,
                      identity=who.cn, cert_serial=who.serial,
                      issuer_fingerprint=who.issuer)  # fmt: skip

    async def _to_leader(self, node: HANode, body: Credentials | None) -> Response:
        """Find the leader and forward the request to it (a follower's answer)."""
        try:
            found = await asyncio.to_thread(node.leader_endpoint)
        except BackendUnavailable as exc:
            node.health.mark_failed(exc)
            return unavailable(str(exc))
        if found is None:
            return not_leader("no leader elected right now")
        info, url = found
        if info.instance_id == node.instance_id:  # elected meanwhile: ask again
            return not_leader("leadership is changing", info.instance_id, url)
        if not url:
            return not_leader("the leader has no advertise_url", info.instance_id, None)
        return await self._relay(node, info, url, body)

    async def _relay(
        self, node: HANode, info: LeaderInfo, url: str, body: Credentials | None
    ) -> Response:
        request = self.request
        payload = (body.model_dump_json(exclude_none=True, exclude={"token"}).encode()
                   if body is not None else None)  # fmt: skip
        cert = self.cert  # the operator certificate's identity, asserted (never the cert)
        who = {"cn": cert.cn, "serial": cert.serial, "issuer": cert.issuer_fingerprint} if cert \
            else {"cn": "", "serial": "", "issuer": ""}  # fmt: skip
        try:
            assertion = forwarding.make(
                node.records.signer, by=node.instance_id, who=who,
                username=body.username if body is not None else "", ip=self.source_ip,
                method=request.method, path=request.url.path, body=payload,
                reqid=logfmt.current_reqid(),
            )  # fmt: skip
        except ClusterError as exc:  # no cluster key: nothing can be asserted
            return not_leader(f"cannot forward to the leader: {exc}", info.instance_id, url)
        headers = {FORWARDED_BY: node.instance_id, EPOCH_HEADER: str(info.epoch),
                   forwarding.HEADER: assertion}  # fmt: skip
        own_tls = bool(self.d.cfg.api_cert and self.d.cfg.api_key)
        allowed = await asyncio.to_thread(_serials, node) if own_tls else None
        try:
            status, raw, ctype = await asyncio.to_thread(
                forward, self.d, url, request.method, request.url.path, payload, headers,
                FORWARD_TIMEOUT, allowed,
            )  # fmt: skip
        except (OSError, http.client.HTTPException) as exc:
            logfmt.event("cluster-forward", path=request.url.path, leader=info.instance_id,
                         url=url, result="error", error=exc)  # fmt: skip
            return not_leader(f"cannot reach the leader: {exc}", info.instance_id, url)
        logfmt.event("cluster-forward", path=request.url.path, leader=info.instance_id, url=url,
                     result=status, epoch=info.epoch)  # fmt: skip
        return Response(raw, status_code=status, media_type=ctype.split(";")[0],
                        headers={"X-Ctrl-Exec-Served-By": info.instance_id})  # fmt: skip


def _serials(node: HANode, server: bool = True) -> set[str]:
    """Serials a peer may present: as a server (the leader we forward to: dispatcher
    serials plus our API certificate's), or as a client (dispatcher serials only)."""
    if node.sync is not None:
        return node.sync.server_serials() if server else node.sync.peer_serials()
    from dispatcher.ha.sync.serving import cert_serial

    own = serial_to_hex(cert_serial(node.cfg.cert))
    return {own} if own else set()


async def cluster_call(request: Request) -> ClusterCall:
    return ClusterCall.of(request)


ClusterCallDep = Annotated[ClusterCall, Depends(cluster_call)]
