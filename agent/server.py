"""The agent's mTLS server on 7443 (``ctrl-exec-agent serve``).

One asyncio loop. Each connection: ``allowed_ips``, rate limits and slots on the TCP peer
(before TLS: at most ``max_conns_per_ip`` open per address until they show a trusted
dispatcher certificate, and the last
``dispatcher_reserved_slots`` of ``max_children`` only for addresses that completed an
mTLS handshake with a trusted dispatcher certificate in the last
:data:`TRUSTED_IP_TTL` seconds, which are also exempt from the per-address cap), the
TLS handshake with a deadline (a silent client never blocks others), the revocation
check before the request is read, one request with upstream's limits, one response, close.
Scripts run as subprocesses of the loop, so many runs proceed at once.

This module keeps loading and reloading (SIGHUP), the accept loop and the route table;
the request handlers are in :mod:`agent.handlers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import ssl
import time
from typing import Any

from agent import allowlist, certinfo, revocation, trustmap
from agent.childwatch import use_pidfd_watcher
from agent.common import logfmt, sdnotify
from agent.common.datefmt import openssl_date
from agent.common.errors import ConfigError
from agent.common.ratelimit import RateLimiter
from agent.common.serial import serial_to_hex
from agent.common.tlsconf import server_context
from agent.common.wire import RequestError, read_request, response_bytes
from agent.config import AgentConfig
from agent.handlers import asyncrun, run, status, trust
from agent.handlers.base import REQID_RE, Handler, Peer, Reply, parse_json, reqid_of
from agent.version import __version__

ev = logfmt.event
TRUSTED_IP_TTL = 3600.0  # how long an address that showed a trusted dispatcher cert is one
MAX_TRUSTED_IPS = 1024

__all__ = ["AgentServer", "Peer"]


class AgentServer:
    """State, reload and the listener; requests go to :mod:`agent.handlers` by route."""

    def __init__(self, cfg: AgentConfig, allowlist_path: str):
        self.cfg = cfg
        self.allowlist_path = allowlist_path
        self.scripts: dict[str, allowlist.Script] = {}
        self.trusted: dict[str, str] = {}
        self.revoked: frozenset[str] = frozenset()
        self.expiry = "unknown"
        self.live = 0
        self.server: asyncio.Server | None = None
        self.limiter = RateLimiter(
            cfg.rate_limit_volume,
            cfg.rate_limit_probe,
            cfg.rate_limit_disable,
            on_event=lambda action, ip, reason: ev(action, logging.WARNING, peer=ip, reason=reason),
        )
        self.ssl_ctx: ssl.SSLContext | None = None
        self.per_ip: dict[str, int] = {}  # open connections by client address
        self.dispatcher_ips: dict[str, float] = {}  # address -> last trusted handshake
        self._cap_logged: dict[str, float] = {}
        self._stopping: asyncio.Event | None = None

    # ----- loading and reloading -------------------------------------------------

    def load_all(self) -> None:
        """Initial load: any error is fatal (the caller exits 78)."""
        self._load_allowlist(strict=True)
        self._load_trust(strict=True)
        self._load_revoked(strict=True)
        self._load_cert()

    def _load_allowlist(self, strict: bool) -> None:
        try:
            scripts, warnings = allowlist.load(self.allowlist_path, self.cfg.script_dirs)
        except ConfigError as exc:
            if strict:
                raise
            ev("config-warn", logging.ERROR, reason=f"{exc}; keeping the last good allowlist")
            return
        for w in warnings:
            ev("config-warn", logging.WARNING, reason=w)
        self.scripts = scripts

    def _load_trust(self, strict: bool) -> None:
        try:
            entries, warnings = trustmap.load(self.cfg.trusted_dispatchers_path)
        except ConfigError as exc:
            if strict:
                raise
            ev("config-warn", logging.ERROR, reason=f"{exc}; keeping the last good map")
            return
        for line, w in warnings:
            ev("config-warn", logging.WARNING,
               reason=f"{self.cfg.trusted_dispatchers_path}:{line}: {w}; skipped")  # fmt: skip
        self.trusted = entries

    def _load_revoked(self, strict: bool) -> None:
        try:
            revoked = revocation.load(self.cfg.revoked_serials)
        except ConfigError as exc:
            if strict:
                raise
            ev("config-warn", logging.ERROR, reason=f"{exc}; keeping the last good list")
            return
        if revoked is None:
            ev("revoked-serials-absent", path=self.cfg.revoked_serials)
            revoked = frozenset()
        self.revoked = revoked

    def _load_cert(self) -> None:
        result = "absent"
        if os.path.exists(self.cfg.cert_staging_path):
            from agent.common import certs  # cryptography (~8 MB RSS) only when a cert is staged

            result = certs.promote(
                self.cfg.cert_staging_path, self.cfg.cert, self.cfg.ca, self.cfg.key
            )
            ev("cert-promote", status=result)
        if self.ssl_ctx is None:
            self.ssl_ctx = server_context(self.cfg.cert, self.cfg.key, self.cfg.ca)
        elif result == "promoted":
            self.ssl_ctx.load_cert_chain(self.cfg.cert, self.cfg.key)
        try:
            self.expiry = openssl_date(certinfo.not_after(self.cfg.cert))
        except (OSError, ValueError, IndexError):
            self.expiry = "unknown"

    def reload(self) -> None:
        """SIGHUP: allowlist, trust map, revocation list, rate-limit state, staged cert."""
        self._load_allowlist(strict=False)
        self._load_trust(strict=False)
        self._load_revoked(strict=False)
        self.limiter.clear()
        try:
            self._load_cert()
        except (OSError, ssl.SSLError, ValueError) as exc:
            ev("config-warn", logging.ERROR, reason=f"certificate reload failed: {exc}")
        ev("reload", scripts=len(self.scripts), dispatchers=len(self.trusted),
           revoked=len(self.revoked))  # fmt: skip

    # ----- serving -----------------------------------------------------------------

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        use_pidfd_watcher()
        self._stopping = asyncio.Event()
        self.server = await asyncio.start_server(
            self._on_connect, host=self.cfg.bind, port=self.cfg.port, backlog=512,
            limit=64 * 1024,
        )  # fmt: skip
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        ev("start", port=self.cfg.port, bind=self.cfg.bind, version=__version__)
        sdnotify.notify("READY=1", f"STATUS=listening on {self.cfg.bind}:{self.cfg.port}")
        if ready is not None:
            ready.set()
        await self._stopping.wait()
        sdnotify.notify("STOPPING=1")
        ev("stop", live=self.live)
        self.server.close()
        # Give in-flight requests a moment to finish; scripts keep their own timeouts.
        deadline = time.monotonic() + 10
        while self.live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _ip_allowed(self, ip: str) -> bool:
        if self.cfg.allowed_ips is None:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.cfg.allowed_ips)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername") or ("", 0)
        ip = str(peername[0])
        try:
            if not self._ip_allowed(ip):
                ev("ip-block", logging.WARNING, peer=ip)
                return
            if self.limiter.blocked(ip):
                return
            if not self._slot_free(ip):
                return
            self.live += 1
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            pending = [True]  # counted against max_conns_per_ip until a dispatcher shows up
            try:
                await self._connection(reader, writer, ip, pending)
            finally:
                self.live -= 1
                if pending[0]:
                    self._release(ip)
        except Exception as exc:  # one connection never takes the listener down
            ev("error", logging.ERROR, peer=ip, reason=f"{exc.__class__.__name__}: {exc}")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    def _recent_dispatcher(self, ip: str) -> bool:
        seen = self.dispatcher_ips.get(ip)
        return seen is not None and time.monotonic() - seen < TRUSTED_IP_TTL

    def _slot_free(self, ip: str) -> bool:
        """A slot for a new connection from ``ip`` (before TLS); logs the refusal."""
        cfg = self.cfg
        if self._recent_dispatcher(ip):
            if self.live < cfg.max_children:
                return True
            ev("overload", logging.WARNING, peer=ip, live=self.live)
            return False
        if self.live >= cfg.max_children - cfg.dispatcher_reserved_slots:
            reason = "reserved-for-dispatchers" if self.live < cfg.max_children else None
            self._refused(ip, "overload", reason)
            return False
        if cfg.max_conns_per_ip and self.per_ip.get(ip, 0) >= cfg.max_conns_per_ip:
            self._refused(ip, "conn-cap", f"more than {cfg.max_conns_per_ip} open")
            return False
        return True

    def _refused(self, ip: str, action: str, reason: str | None) -> None:
        """Log a refused connection, at most once per address every 10 s."""
        now = time.monotonic()
        if now - self._cap_logged.get(ip, -10.0) < 10.0:
            return
        if len(self._cap_logged) >= MAX_TRUSTED_IPS:
            self._cap_logged.clear()
        self._cap_logged[ip] = now
        ev(action, logging.WARNING, peer=ip, live=self.live, open=self.per_ip.get(ip, 0),
           reason=reason)  # fmt: skip

    def _release(self, ip: str) -> None:
        if (left := self.per_ip.get(ip, 1) - 1) > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)

    def _mark_dispatcher(self, ip: str) -> None:
        if ip not in self.dispatcher_ips and len(self.dispatcher_ips) >= MAX_TRUSTED_IPS:
            oldest = min(self.dispatcher_ips, key=self.dispatcher_ips.__getitem__)
            del self.dispatcher_ips[oldest]
        self.dispatcher_ips[ip] = time.monotonic()

    async def _connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ip: str,
        pending: list[bool] | None = None,
    ) -> None:
        assert self.ssl_ctx is not None
        try:
            await writer.start_tls(self.ssl_ctx, ssl_handshake_timeout=self.cfg.handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            ev("tls-failure", logging.WARNING, peer=ip, reason=reason)
            self.limiter.record_failure(ip)
            return
        sslobj = writer.get_extra_info("ssl_object")
        cert = sslobj.getpeercert() if sslobj is not None else None
        peer = Peer(ip, serial_to_hex(cert.get("serialNumber", "")) if cert else "")
        if cert and sslobj is not None:
            peer.cert_der = sslobj.getpeercert(binary_form=True) or b""
        peer.dispatcher = self.trusted.get(peer.serial) if peer.serial else None
        if peer.dispatcher is not None and not (self.revoked and peer.serial in self.revoked):
            self._mark_dispatcher(ip)
            if pending is not None and pending[0]:  # authenticated: no longer pre-TLS
                pending[0] = False
                self._release(ip)
        # Authenticated dispatchers are exempt from the volume limit (they fan out to us).
        if peer.dispatcher is None and self.limiter.record_connection(ip):
            return
        if peer.serial and peer.serial in self.revoked:
            ev("revoked-cert", logging.WARNING, peer=ip, serial=peer.serial)
            await self._send(writer, 403, {"error": "certificate revoked"})
            return
        try:
            req = await asyncio.wait_for(read_request(reader), self.cfg.request_timeout)
        except RequestError as exc:
            await self._send(writer, exc.code, exc.body)
            return
        except TimeoutError:
            ev("timeout", logging.WARNING, peer=ip, reason="request not received in time")
            return
        code, body = await self.route(req.method, req.path, req.body, peer)
        await self._send(writer, code, body)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, code: int, body: dict[str, Any]) -> None:
        writer.write(response_bytes(code, body))
        with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(writer.drain(), 30)

    # ----- routing ---------------------------------------------------------------------

    def reload_trust(self) -> None:
        """Re-read the trust map (after ``/rotate-serial`` changed it)."""
        self._load_trust(strict=False)

    def reload_ca(self) -> None:
        """Trust exactly the CA file now (after ``/ca-bundle`` changed it): a new server
        context for the next connections (one in progress keeps its own)."""
        self.ssl_ctx = server_context(self.cfg.cert, self.cfg.key, self.cfg.ca)
        ev("ca-reload", path=self.cfg.ca)

    async def route(self, method: str, path: str, body: bytes, peer: Peer) -> Reply:
        """The request's handler, every line it logs carrying the request's reqid (of the
        body, or of ``/result/<reqid>``), so one grep joins them with the dispatcher's."""
        reqid = _reqid(method, path, body)
        if not reqid:
            return await self._route(method, path, body, peer)
        with logfmt.request(reqid):
            return await self._route(method, path, body, peer)

    async def _route(self, method: str, path: str, body: bytes, peer: Peer) -> Reply:
        handler = ROUTES.get((method, path))
        if handler is not None:
            return await handler(self, peer, body, "")
        for m, prefix, h in PREFIX_ROUTES:
            if method == m and path.startswith(prefix):
                return await h(self, peer, body, path[len(prefix) :])
        return 404, {"error": "not found"}


def _reqid(method: str, path: str, body: bytes) -> str:
    """The reqid a request names, if it is one the handlers accept (else ``""``)."""
    if method == "GET" and path.startswith("/result/"):
        rid = path[len("/result/") :]
    elif b'"reqid"' in body:
        rid = reqid_of(parse_json(body))
    else:
        return ""
    return rid if REQID_RE.match(rid) else ""


ROUTES: dict[tuple[str, str], Handler] = {
    ("POST", "/run"): run.run,
    ("POST", "/ping"): status.ping,
    ("GET", "/capabilities"): status.capabilities,
    ("POST", "/rotate-serial"): trust.rotate_serial,
    ("POST", "/renew"): trust.renew,
    ("POST", "/renew-complete"): trust.renew_complete,
    ("POST", "/ca-bundle"): trust.ca_bundle,
}
PREFIX_ROUTES: tuple[tuple[str, str, Handler], ...] = (("GET", "/result/", asyncrun.result),)
