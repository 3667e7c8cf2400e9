"""PROXY protocol v2 in front of the API: the real client address behind HAProxy.

In TCP passthrough HAProxy connects to the instance from its own address, so without
help every request would be logged and authorised as coming from the load balancer. With
``api_proxy_port`` set, the instance opens a second API listener on
``api_bind:api_proxy_port`` that expects HAProxy's ``send-proxy-v2`` header:

* only peers in ``api_proxy_sources`` (addresses or networks of the load balancers,
  default ``127.0.0.1``) may connect; anyone else is closed before a byte is read, so a
  client that reaches the port directly can never choose its own address;
* the header is read **before TLS**, from the raw socket, and exactly: the 16-byte prefix,
  then the announced length (at most :data:`MAX_PAYLOAD`), never a byte more, so the TLS
  ClientHello stays in the kernel for the TLS layer; a bad signature, a wrong version or
  command, an unknown family, a truncated or oversized header, or a silent peer
  (``header_timeout``) closes the connection;
* the socket is then handed to asyncio with ``loop.connect_accepted_socket`` and the API
  ``SSLContext``, under uvicorn's own HTTP protocol class (the peer-certificate subclass
  of :mod:`dispatcher.api.peercert` included), created the way ``uvicorn.Server`` creates
  it, sharing the server's state, so shutdown and draining treat these connections like
  any other. After ``connection_made`` the protocol's ``client`` (uvicorn's source of
  ``scope["client"]``) is the address from the header; the ``api-request`` log line and
  the auth hook's ``ENVEXEC_SOURCE_IP`` carry it, and ``scope["state"]["proxy_peer"]``
  names the load balancer it came through.

The header parser and the trusted-sources rule live in :mod:`dispatcher.proxyv2` (the
pairing listener uses them too) and are re-exported here.

A ``LOCAL`` header (HAProxy's own health checks with ``check-send-proxy``) and the
address-less families (``UNSPEC``, ``UNIX``) keep the real TCP peer as the client, as the
specification asks (haproxy ``doc/proxy-protocol.txt``, section 2.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterable
from typing import Any

from agent.common import logfmt
from dispatcher.config import DispatcherConfig
from dispatcher.netaddr import plain_ip
from dispatcher.proxyv2 import (  # the parser, shared with the pairing listener
    AF_INET,
    AF_INET6,
    AF_UNIX,
    AF_UNSPEC,
    CMD_LOCAL,
    CMD_PROXY,
    MAX_PAYLOAD,
    PREFIX_LEN,
    PROTO_DGRAM,
    PROTO_STREAM,
    PROTO_UNSPEC,
    SIGNATURE,
    VERSION,
    Address,
    Network,
    ProxyHeader,
    ProxyProtocolError,
    build,
    parse,
    parse_sources,
    payload_length,
    read_header,
    trusted,
)

__all__ = [
    "AF_INET",
    "AF_INET6",
    "AF_UNIX",
    "AF_UNSPEC",
    "CMD_LOCAL",
    "CMD_PROXY",
    "MAX_PAYLOAD",
    "PREFIX_LEN",
    "PROTO_DGRAM",
    "PROTO_STREAM",
    "PROTO_UNSPEC",
    "SIGNATURE",
    "VERSION",
    "Address",
    "Network",
    "ProxyHeader",
    "ProxyListener",
    "ProxyProtocolError",
    "build",
    "check_config",
    "parse",
    "parse_sources",
    "payload_length",
    "proxied_protocol_class",
    "read_header",
    "start_for",
    "trusted",
]

# ----- uvicorn glue -----------------------------------------------------------------------

_PROXIED: dict[type[Any], type[Any]] = {}


def proxied_protocol_class(base: type[Any]) -> type[Any]:
    """``base`` (a uvicorn HTTP protocol class) whose client address comes from the header.

    Instances get ``proxy_client`` (the address to report, or None to keep the TCP peer)
    and ``proxy_peer`` (the load balancer's address) before ``connection_made``.
    """
    cls = _PROXIED.get(base)
    if cls is not None:
        return cls

    def connection_made(self: Any, transport: asyncio.BaseTransport) -> None:
        base.connection_made(self, transport)
        if self.proxy_client is not None:
            self.client = self.proxy_client
        self.app_state = {**self.app_state, "proxy_peer": self.proxy_peer}

    cls = type(
        f"Proxied{base.__name__}",
        (base,),
        {"connection_made": connection_made, "proxy_client": None, "proxy_peer": None},
    )
    _PROXIED[base] = cls
    return cls


class ProxyListener:
    """The PROXY v2 API listener, feeding connections to a started ``uvicorn.Server``."""

    def __init__(
        self,
        server: Any,  # uvicorn.Server (started: config loaded, lifespan state present)
        *,
        host: str,
        port: int,
        sources: Iterable[str],
        ssl_ctx: ssl.SSLContext | None,
        header_timeout: float = 5.0,
        handshake_timeout: float = 10.0,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.server = server
        self.host = host
        self.port = port
        self.networks = parse_sources(sources)
        self.ssl_ctx = ssl_ctx
        self.header_timeout = header_timeout
        self.handshake_timeout = handshake_timeout
        self.max_payload = max_payload
        self.sock: socket.socket | None = None
        self._accept: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind and listen (raises OSError when the port is taken); ``sock``: already bound."""
        if sock is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if sock.getsockname()[1] == 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
            sock.listen(self.server.config.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.port = int(sock.getsockname()[1])
        self._accept = asyncio.create_task(self._accept_loop())
        logfmt.event("api-proxy-start", bind=self.host, port=self.port,
                     sources=",".join(str(n) for n in self.networks) or "none")  # fmt: skip

    async def close(self) -> None:
        """Stop accepting; connections already handed to uvicorn are uvicorn's to drain."""
        if self._accept is not None:
            self._accept.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept
            self._accept = None
        for t in list(self._pending):
            t.cancel()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            logfmt.event("api-proxy-stop", port=self.port)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except OSError as exc:  # EMFILE and friends: do not spin
                logfmt.event("api-proxy-error", logging.ERROR, error=exc)
                await asyncio.sleep(0.1)
                continue
            peer = plain_ip(str(addr[0]))
            if not trusted(peer, self.networks):
                logfmt.event("api-proxy-refuse", logging.WARNING, peer=peer,
                             reason="not-a-trusted-proxy")  # fmt: skip
                _abort(conn)
                continue
            task = asyncio.create_task(self._handle(conn, (peer, int(addr[1]))))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _handle(self, conn: socket.socket, peer: Address) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            header = await asyncio.wait_for(
                read_header(conn, self.max_payload), self.header_timeout
            )
        except (ProxyProtocolError, TimeoutError, OSError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else str(exc)
            logfmt.event("api-proxy-reject", logging.WARNING, peer=peer[0], reason=reason)
            _abort(conn)
            return
        except asyncio.CancelledError:  # the listener is closing
            _abort(conn)
            raise
        client = header.client

        def factory() -> asyncio.Protocol:
            cfg = self.server.config
            cls = proxied_protocol_class(cfg.http_protocol_class)
            proto: Any = cls(config=cfg, server_state=self.server.server_state,
                             app_state=self.server.lifespan.state)  # fmt: skip
            proto.proxy_client = client
            proto.proxy_peer = peer[0]
            result: asyncio.Protocol = proto
            return result

        try:
            await loop.connect_accepted_socket(
                factory, conn, ssl=self.ssl_ctx,
                ssl_handshake_timeout=self.handshake_timeout if self.ssl_ctx else None,
            )  # fmt: skip
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            # a refused certificate is worth a warning; a peer that hung up (HAProxy passing
            # on a port probe) or stalled is not
            level = logging.WARNING if isinstance(exc, ssl.SSLError) else logging.DEBUG
            logfmt.event("tls-failure", level, peer=(client or peer)[0], via=peer[0],
                         reason=getattr(exc, "reason", None) or type(exc).__name__)  # fmt: skip
            _abort(conn)


def _abort(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.close()


def check_config(cfg: DispatcherConfig) -> None:
    """Raise ConfigError (file:line) when ``api_proxy_port``/``api_proxy_sources`` are unusable."""
    if not cfg.api_proxy_port:
        return
    if not 0 < cfg.api_proxy_port < 65536 or cfg.api_proxy_port == cfg.api_port:
        raise cfg.error("api_proxy_port",
                        f"api_proxy_port {cfg.api_proxy_port} is not a free port number")  # fmt: skip
    try:
        nets = parse_sources(cfg.api_proxy_sources)
    except ValueError as exc:
        raise cfg.error("api_proxy_sources", str(exc)) from None
    if not nets:
        raise cfg.error("api_proxy_sources", "api_proxy_port is set but api_proxy_sources is empty")


async def start_for(
    server: Any,
    cfg: DispatcherConfig,
    ssl_ctx: ssl.SSLContext | None,
    sock: socket.socket | None = None,
) -> ProxyListener | None:
    """The daemon's hook: a started listener when ``cfg.api_proxy_port`` is set, else None."""
    if not cfg.api_proxy_port:
        return None
    listener = ProxyListener(
        server, host=cfg.api_bind, port=cfg.api_proxy_port, sources=cfg.api_proxy_sources,
        ssl_ctx=ssl_ctx,
    )  # fmt: skip
    await listener.start(sock)
    return listener
