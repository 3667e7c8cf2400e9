"""Server contexts issue one TLS 1.3 session ticket per handshake, and one is enough: a
client that keeps the newest session resumes connection after connection."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from agent.common.tlsconf import SESSION_TICKETS, client_context, server_context
from ops.lab.pki import TestCA


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    tmp: Path = tmp_path_factory.mktemp("tickets")
    ca = TestCA(tmp / "pki")
    agent = ca.issue("agent", cn="agent.test")
    disp = ca.issue("dispatcher", cn="ctrl-exec-dispatcher")
    server = server_context(str(agent.cert), str(agent.key), str(ca.cert_path))
    client = client_context(str(ca.cert_path), str(disp.cert), str(disp.key))
    return server, client


def _connect(server: ssl.SSLContext, client: ssl.SSLContext,
             session: ssl.SSLSession | None) -> ssl.SSLObject:  # fmt: skip
    """One connection over memory BIOs, a request and its answer read (which reads the
    tickets sent after the handshake); returns the client end."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_side=False, session=session)
    done = [False, False]
    for _ in range(10):  # bounded: a TLS 1.3 handshake is two flights
        for i, end in enumerate((cli, srv)):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            break
    assert all(done), done
    cli.write(b"ping")
    s_in.write(c_out.read())
    assert srv.read(4) == b"ping"
    srv.write(b"pong")
    c_in.write(s_out.read())
    assert cli.read(4) == b"pong"
    return cli


def test_one_ticket_per_handshake(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, _ = contexts
    assert server.num_tickets == SESSION_TICKETS == 1


def test_one_ticket_keeps_resuming(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, client = contexts
    cli = _connect(server, client, None)
    assert cli.version() == "TLSv1.3" and not cli.session_reused
    for _ in range(5):
        session = cli.session
        assert session is not None and session.has_ticket
        cli = _connect(server, client, session)
        assert cli.session_reused
