"""Bounds on API connections that uvicorn does not have: a header-read timeout and a cap
on open connections per client address.

:func:`bounded_protocol_class` wraps the HTTP protocol class the daemon gives uvicorn
(the peer-certificate one of :mod:`dispatcher.api.peercert`), so connections on the API
port and on the PROXY v2 port (:mod:`dispatcher.api.proxyproto` builds its protocols from
the same class) are bounded alike:

* ``api_header_timeout``: once connected (after the TLS handshake), and again whenever a
  kept-alive connection starts sending a new request, the request head must be complete
  within this many seconds, else the connection is closed (``api-header-timeout``).
  uvicorn's keep-alive timer only runs between requests, so a client that sends part of
  a head would otherwise hold its connection for ever;
* ``api_max_conns_per_ip``: a client address (behind HAProxy: the one from the PROXY v2
  header) with that many connections open has any further one closed at once
  (``api-conn-refused``), before a byte of it reaches the application.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agent.common import logfmt

_BOUNDED: dict[tuple[type[Any], float, int], type[Any]] = {}


def _client_ip(proto: Any) -> str:
    client = getattr(proto, "proxy_client", None) or getattr(proto, "client", None)
    return str(client[0]) if client else ""


def _counts(proto: Any) -> dict[str, int]:
    """Open connections per client IP, shared by every connection of one server."""
    state = proto.server_state
    counts: dict[str, int] | None = getattr(state, "ctrl_exec_per_ip", None)
    if counts is None:
        counts = {}
        state.ctrl_exec_per_ip = counts
    return counts


def bounded_protocol_class(base: type[Any], header_timeout: float, max_per_ip: int) -> type[Any]:
    """``base`` (a uvicorn HTTP protocol class) with the two bounds above."""
    key = (base, header_timeout, max_per_ip)
    cls = _BOUNDED.get(key)
    if cls is not None:
        return cls

    def connection_made(self: Any, transport: asyncio.Transport) -> None:
        base.connection_made(self, transport)
        self.ctrl_exec_ip = None
        self.ctrl_exec_head_timer = None
        ip = _client_ip(self)
        counts = _counts(self)
        if counts.get(ip, 0) >= max_per_ip:
            logfmt.event("api-conn-refused", logging.WARNING, peer=ip,
                         reason=f"more than {max_per_ip} connections from this address")  # fmt: skip
            transport.abort()
            return
        counts[ip] = counts.get(ip, 0) + 1
        self.ctrl_exec_ip = ip
        _arm(self)

    def connection_lost(self: Any, exc: Exception | None) -> None:
        _disarm(self)
        ip = getattr(self, "ctrl_exec_ip", None)
        if ip is not None:
            self.ctrl_exec_ip = None
            counts = _counts(self)
            left = counts.get(ip, 1) - 1
            if left > 0:
                counts[ip] = left
            else:
                counts.pop(ip, None)
        base.connection_lost(self, exc)

    def data_received(self: Any, data: bytes) -> None:
        if _between_requests(self) and getattr(self, "ctrl_exec_ip", None) is not None:
            _arm(self)
        base.data_received(self, data)
        if not _between_requests(self):
            _disarm(self)  # the head is complete: the request is the app's now

    def _arm(self: Any) -> None:
        if getattr(self, "ctrl_exec_head_timer", None) is None:
            loop = asyncio.get_running_loop()
            self.ctrl_exec_head_timer = loop.call_later(header_timeout, _expired, self)

    def _expired(self: Any) -> None:
        self.ctrl_exec_head_timer = None
        if _between_requests(self) and not self.transport.is_closing():
            logfmt.event("api-header-timeout", logging.WARNING, peer=_client_ip(self),
                         timeout=header_timeout)  # fmt: skip
            self.transport.abort()

    cls = type(
        f"Bounded{base.__name__}",
        (base,),
        {"connection_made": connection_made, "connection_lost": connection_lost,
         "data_received": data_received},
    )  # fmt: skip
    _BOUNDED[key] = cls
    return cls


def _between_requests(proto: Any) -> bool:
    """No request head received yet, or the last response is complete."""
    cycle = getattr(proto, "cycle", None)
    return cycle is None or bool(cycle.response_complete)


def _disarm(proto: Any) -> None:
    timer = getattr(proto, "ctrl_exec_head_timer", None)
    if timer is not None:
        timer.cancel()
        proto.ctrl_exec_head_timer = None
