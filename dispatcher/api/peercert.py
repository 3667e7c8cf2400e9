"""The TLS client certificate of each API connection, made visible to the app.

uvicorn 0.54 puts no ASGI ``tls`` extension into the scope. It does copy the
per-connection ``app_state`` dict into ``scope["state"]`` for every request, so the
protocol classes below read the peer certificate once, in ``connection_made``, and give
each connection its own ``app_state`` (a new dict, never the shared lifespan one) holding:

* ``peer_cert_der``: the DER bytes of the verified client certificate, or None;
* ``peer_identity``: the operator identity (the subject CN, else the whole subject);
* ``peer_serial``: the certificate serial as lower-case hex;
* ``tls_version``: e.g. ``TLSv1.3``, or None on plain HTTP;
* ``peer_issuer``: the issuer of the client certificate (RFC 4514), or None.

Request handlers read them as ``request.state.peer_identity`` and so on. This relies on
uvicorn internals (``app_state`` in ``httptools_impl`` and ``h11_impl``); the
integration test ``tests/integration/test_api_peercert.py`` guards it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # httptools is optional in uvicorn; fall back to h11 without it
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is installed with uvicorn[standard]
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

STATE_KEYS = ("peer_cert_der", "peer_identity", "peer_serial", "tls_version", "peer_issuer")


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other end of a TLS connection."""

    identity: str
    serial: str
    issuer: str = ""


def identity_of(der: bytes | None) -> PeerIdentity | None:
    """Operator identity (subject CN, else the RFC 4514 subject) and hex serial."""
    if not der:
        return None
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        value = cns[0].value
        ident = value.decode(errors="replace") if isinstance(value, bytes) else value
    else:
        ident = cert.subject.rfc4514_string()
    return PeerIdentity(identity=ident, serial=format(cert.serial_number, "x"),
                        issuer=cert.issuer.rfc4514_string())  # fmt: skip


def peer_state(transport: asyncio.BaseTransport) -> dict[str, Any]:
    """The per-connection state keys for ``transport`` (all None without TLS)."""
    so = transport.get_extra_info("ssl_object")
    der: bytes | None = None
    version: str | None = None
    if so is not None:
        der = so.getpeercert(binary_form=True)
        version = so.version()
    try:
        who = identity_of(der)
    except ValueError:  # verified by OpenSSL, so this should not happen; stay anonymous
        who = None
    return {
        "peer_cert_der": der,
        "peer_identity": who.identity if who else None,
        "peer_serial": who.serial if who else None,
        "tls_version": version,
        "peer_issuer": who.issuer if who else None,
    }


def state_of(scope_state: object) -> dict[str, Any]:
    """The peer keys from a request's ``scope["state"]`` (None where absent)."""
    src = scope_state if isinstance(scope_state, dict) else {}
    return {k: src.get(k) for k in STATE_KEYS}


class PeerCertH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the peer certificate in the connection state."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app_state = {**self.app_state, **peer_state(transport)}


if HttpToolsProtocol is not None:

    class PeerCertHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with the peer certificate in the connection state."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.app_state = {**self.app_state, **peer_state(transport)}


def protocol_class() -> type[asyncio.Protocol]:
    """The httptools variant when httptools is installed, else the h11 one."""
    if HttpToolsProtocol is not None:
        return PeerCertHttpToolsProtocol
    return PeerCertH11Protocol  # pragma: no cover
