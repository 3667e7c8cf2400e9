"""dispatcher.api.peercert on a real uvicorn TLS server: per-connection identities."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from agent.common.tlsconf import server_context
from dispatcher.api.peercert import (
    PeerCertH11Protocol,
    identity_of,
    protocol_class,
)
from ops.lab.net import free_port
from ops.lab.pki import Issued, TestCA

pytestmark = pytest.mark.integration


def whoami_app() -> FastAPI:
    app = FastAPI()

    @app.get("/whoami")
    async def whoami(request: Request) -> dict[str, object]:
        der = request.state.peer_cert_der
        return {
            "identity": request.state.peer_identity,
            "serial": request.state.peer_serial,
            "tls": request.state.tls_version,
            "der_matches": identity_of(der) == identity_of(der),
        }

    return app


def serve(tmp: Path, pki: TestCA, protocol: type) -> Iterator[str]:
    server_cert = pki.issue(f"peercert-server-{protocol.__name__}", cn="api.test")
    ctx = server_context(str(server_cert.cert), str(server_cert.key), ca=str(pki.cert_path),
                         require_client_cert=False)  # fmt: skip
    port = free_port()
    config = uvicorn.Config(
        whoami_app(), host="127.0.0.1", port=port, http=protocol, lifespan="off",
        log_config=None, access_log=False, ssl_context_factory=lambda _c, _d: ctx,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module", params=["default", "h11"])
def server_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: TestCA
) -> Iterator[str]:
    protocol = protocol_class() if request.param == "default" else PeerCertH11Protocol
    yield from serve(tmp_path_factory.mktemp("peercert"), pki, protocol)


def client(pki: TestCA, who: Issued | None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(pki.cert_path))
    ctx.check_hostname = False
    if who is not None:
        ctx.load_cert_chain(str(who.cert), str(who.key))
    return httpx.Client(verify=ctx, trust_env=False, timeout=10)


def test_each_connection_sees_its_own_certificate(server_url: str, pki: TestCA) -> None:
    alice = pki.issue("op-alice", cn="alice")
    bob = pki.issue("op-bob", cn="bob")
    with client(pki, alice) as a, client(pki, bob) as b, client(pki, None) as anon:
        seen = []
        # Interleave requests on three kept-alive connections: a shared (not per
        # connection) state dict would show the newest connection's identity everywhere.
        for c in (a, b, anon, a, b, anon):
            r = c.get(f"{server_url}/whoami")
            assert r.status_code == 200
            seen.append(r.json())
    assert [s["identity"] for s in seen] == ["alice", "bob", None] * 2
    assert seen[0]["serial"] == alice.serial_hex
    assert seen[1]["serial"] == bob.serial_hex
    assert seen[2]["serial"] is None
    assert all(s["tls"] in ("TLSv1.2", "TLSv1.3") for s in seen)


def test_identity_of_falls_back_to_the_subject(pki: TestCA, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    assert identity_of(None) is None
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.sign_public_key(key.public_key(), "carol", serial=0xABC123)
    der = cert.public_bytes(Encoding.DER)
    who = identity_of(der)
    assert who is not None and who.identity == "carol" and who.serial == "abc123"
    assert x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
