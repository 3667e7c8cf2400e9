"""Talking to a peer instance: its API over mTLS (dispatcher identity), its health port.

The client context presents the dispatcher certificate (read from disk at each call, so a
swapped pair is used at once) and verifies the peer's API certificate against the
dispatcher CA (and the operator CA, when the API certificate comes from there). Instances
are told apart by the chain, not the host name: the API certificate names the service.
"""

from __future__ import annotations

import http.client
import ssl
from urllib.parse import quote, urlsplit

from dispatcher.config import DispatcherConfig


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
