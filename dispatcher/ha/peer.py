"""Talking to a peer instance: its API over mTLS (dispatcher identity), its health port.

The client context presents the dispatcher certificate (read from disk at each call, so a
swapped pair is used at once) and verifies the peer's API certificate against the
dispatcher CA (and the operator CA, when the API certificate comes from there). Instances
are told apart by the chain, not the host name: the API certificate names the service.

The chain alone says nothing about *who* the peer is (an agent certificate comes from the
same CA): before fetching files from a peer or forwarding a request to it, the caller
checks that the certificate it presented carries one of the cluster's dispatcher serials
(:func:`check_serial`, :func:`connect_checked`); anything else is refused with
:class:`PeerRefused` and a ``peer-refused`` log line.
"""

from __future__ import annotations

import http.client
import logging
import ssl
from collections.abc import Callable
from urllib.parse import quote, urlsplit

from agent.common import logfmt
from agent.common.serial import serial_to_hex
from dispatcher.config import DispatcherConfig


class PeerRefused(ssl.SSLError):
    """The peer's certificate is not a dispatcher certificate of this cluster."""


def client_ctx(cfg: DispatcherConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cfg.ca)
    if cfg.api_client_ca and cfg.api_client_ca != cfg.ca:
        ctx.load_verify_locations(cfg.api_client_ca)
    ctx.check_hostname = False
    ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    try:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    except (OSError, ssl.SSLError):
        pass  # the peer then refuses us with a clear 403
    return ctx


def connect(cfg: DispatcherConfig, url: str, timeout: float) -> http.client.HTTPConnection:
    """A connection to a peer's API (``https`` with :func:`client_ctx`, else plain)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    if parts.scheme == "https":
        return http.client.HTTPSConnection(host, port or 443, timeout=timeout,
                                           context=client_ctx(cfg))  # fmt: skip
    return http.client.HTTPConnection(host, port or 80, timeout=timeout)


def presented_serial(conn: http.client.HTTPConnection) -> str:
    """The (hex) serial of the certificate the connected peer presented ("" if none)."""
    sock = conn.sock
    if not isinstance(sock, ssl.SSLSocket):
        return ""
    cert = sock.getpeercert()
    return serial_to_hex(str((cert or {}).get("serialNumber", "")))


def check_serial(conn: http.client.HTTPConnection, allowed: set[str], url: str,
                 purpose: str) -> None:  # fmt: skip
    """Raise :class:`PeerRefused` (and log it) unless the connected peer presented one of
    the ``allowed`` dispatcher serials."""
    serial = presented_serial(conn)
    if serial and serial in allowed:
        return
    logfmt.event("peer-refused", logging.WARNING, url=url, purpose=purpose,
                 serial=serial or "-",
                 reason="the peer's certificate is not a dispatcher certificate of this cluster")  # fmt: skip
    conn.close()
    raise PeerRefused(
        f"{url}: certificate serial {serial or '-'} is not a dispatcher serial of this cluster"
    )


def connect_checked(cfg: DispatcherConfig, url: str, timeout: float,
                    allowed: Callable[[], set[str]], purpose: str) -> http.client.HTTPSConnection:  # fmt: skip
    """A connected TLS connection to a peer whose certificate passed :func:`check_serial`
    (plain ``http`` is refused: no identity)."""
    if urlsplit(url).scheme != "https":
        logfmt.event("peer-refused", logging.WARNING, url=url, purpose=purpose,
                     reason="no TLS: the peer's identity cannot be checked")  # fmt: skip
        raise PeerRefused(f"{url}: no TLS, the peer's identity cannot be checked")
    conn = connect(cfg, url, timeout)
    assert isinstance(conn, http.client.HTTPSConnection)
    conn.auto_open = 0  # never a silent reconnect that skips the check
    conn.connect()
    check_serial(conn, allowed(), url, purpose)
    return conn


def base_path(url: str) -> str:
    return urlsplit(url).path.rstrip("/")


def file_url_path(url: str, logical: str, generation: int) -> str:
    """``/cluster/files/<logical>?generation=N`` under the peer's base path."""
    return f"{base_path(url)}/cluster/files/{quote(logical, safe='/')}?generation={generation}"


def health_ok(advertise_url: str, health_port: int, path: str = "/ready",
              timeout: float = 1.0) -> bool:  # fmt: skip
    """True when the peer's plain-HTTP health port answers ``path`` with 200."""
    host = urlsplit(advertise_url).hostname
    if not host or not health_port:
        return False
    conn = http.client.HTTPConnection(host, health_port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
