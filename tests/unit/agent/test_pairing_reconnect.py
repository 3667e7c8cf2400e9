"""The agent's reconnection while it waits for a decision (agent/pairing.py).

A scripted TLS listener on loopback plays the dispatcher side, one behaviour per
connection: answer ``pending`` then hang up (the leader died), answer "pairing
unavailable" (a new leader whose store hiccups), or answer ``pending`` and the approval.
The agent must send the same request (same CSR and nonce) each time.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import pairing
from agent.common.tlsconf import server_context
from agent.common.wire import response_bytes
from dispatcher.pki import ca as pki

Behaviour = Callable[[ssl.SSLSocket, dict[str, Any]], None]


class Listener:
    """A loopback TCP listener serving each connection with :meth:`serve` on its thread."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.serve(raw)

    def serve(self, raw: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


class Scripted(Listener):
    """Serves connection n with ``script[n]`` (the last one again after the end)."""

    def __init__(self, ctx: ssl.SSLContext, script: list[Behaviour]) -> None:
        self.ctx = ctx
        self.script = script
        self.requests: list[dict[str, Any]] = []
        super().__init__()

    def serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(65536)
                    if not chunk:  # the client left before sending a request
                        raise ValueError("closed")
                    head += chunk
                h, _, body = head.partition(b"\r\n\r\n")
                length = int(h.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(body) < length:
                    body += s.recv(65536)
                req = json.loads(body)
                self.requests.append(req)
                n = min(len(self.requests), len(self.script)) - 1
                self.script[n](s, req)
        except (OSError, ValueError, IndexError):
            pass


def pending_then_hang_up(s: ssl.SSLSocket, req: dict[str, Any]) -> None:
    s.sendall(response_bytes(200, {"status": "pending", "reqid": "r1"}))


def unavailable(s: ssl.SSLSocket, req: dict[str, Any]) -> None:
    s.sendall(response_bytes(200, {"status": "error",
                                   "reason": "pairing unavailable, try again later"}))  # fmt: skip


@pytest.fixture
def ca(tmp_path: Path) -> pki.CA:
    ca = pki.create_ca(tmp_path / "ca")
    pki.issue_dispatcher_cert(ca, tmp_path / "d.crt", tmp_path / "d.key")
    return ca


@pytest.fixture
def listener(tmp_path: Path, ca: pki.CA) -> Iterator[Callable[[list[Behaviour]], Scripted]]:
    made: list[Scripted] = []

    def make(script: list[Behaviour]) -> Scripted:
        srv = Scripted(server_context(str(tmp_path / "d.crt"), str(tmp_path / "d.key")), script)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.close()


def approving(ca: pki.CA) -> Behaviour:
    def go(s: ssl.SSLSocket, req: dict[str, Any]) -> None:
        s.sendall(response_bytes(200, {"status": "pending", "reqid": "r1"}))
        s.sendall(response_bytes(200, {"status": "approved", "cert": pki.sign_csr(ca, req["csr"]),
                                       "ca": ca.pem, "nonce": req["nonce"],
                                       "dispatcher_serial": "", "dispatcher_id": "d"}))  # fmt: skip

    return go


def test_reconnects_with_the_same_request_until_approved(
    ca: pki.CA, listener: Callable[[list[Behaviour]], Scripted]
) -> None:
    srv = listener([pending_then_hang_up, unavailable, approving(ca)])
    req = pairing.prepare("agent.example", "ec-p256")
    session = pairing.Session("127.0.0.1", srv.port, timeout=10)
    assert session.submit(req, {"port": 7443}) == "r1"
    said: list[str] = []
    pauses: list[float] = []
    result, last = pairing.wait_reconnecting(session, req, {"port": 7443}, 30, say=said.append,
                                             sleep=pauses.append)  # fmt: skip
    last.close()
    assert result["status"] == "approved" and result["nonce"] == req.nonce
    assert len(srv.requests) == 3
    assert {(r["csr"], r["nonce"]) for r in srv.requests} == {(req.csr, req.nonce)}
    assert pauses == [0.5, 1.0]  # growing pauses
    assert "dispatcher closed the pairing connection" in said[0]
    assert "pairing unavailable" in said[1] and said[-1].startswith("Reconnected: request r1")


def test_gives_up_after_the_bounded_number_of_reconnects(
    listener: Callable[[list[Behaviour]], Scripted],
) -> None:
    srv = listener([pending_then_hang_up])
    req = pairing.prepare("agent.example", "ec-p256")
    session = pairing.Session("127.0.0.1", srv.port, timeout=10)
    session.submit(req, {})
    pauses: list[float] = []
    with pytest.raises(pairing.PairingError, match="gave up after 3 reconnects"):
        pairing.wait_reconnecting(session, req, {}, 60, reconnects=3, say=lambda m: None,
                                  sleep=pauses.append)  # fmt: skip
    assert pauses == [0.5, 1.0, 2.0]
    assert len(srv.requests) == 4  # the first request and three resubmissions


def test_a_refusal_or_a_denial_is_not_retried(
    listener: Callable[[list[Behaviour]], Scripted],
) -> None:
    def deny(s: ssl.SSLSocket, req: dict[str, Any]) -> None:
        s.sendall(response_bytes(200, {"status": "pending", "reqid": "r1"}))
        s.sendall(response_bytes(200, {"status": "denied", "reason": "rejected by operator"}))

    def duplicate(s: ssl.SSLSocket, req: dict[str, Any]) -> None:
        s.sendall(response_bytes(200, {"status": "error", "reason": "duplicate request"}))

    srv = listener([deny])
    req = pairing.prepare("agent.example", "ec-p256")
    session = pairing.Session("127.0.0.1", srv.port, timeout=10)
    session.submit(req, {})
    with pytest.raises(pairing.PairingError, match="rejected by operator") as info:
        pairing.wait_reconnecting(session, req, {}, 30, say=lambda m: None, sleep=lambda p: None)
    assert info.value.denied and len(srv.requests) == 1
    srv2 = listener([pending_then_hang_up, duplicate])
    session = pairing.Session("127.0.0.1", srv2.port, timeout=10)
    session.submit(req, {})
    with pytest.raises(pairing.PairingError, match="pairing refused: duplicate request"):
        pairing.wait_reconnecting(session, req, {}, 30, say=lambda m: None, sleep=lambda p: None)
    assert len(srv2.requests) == 2


def close_before_answering(s: ssl.SSLSocket, req: dict[str, Any]) -> None:
    """The request arrived but nothing is answered: a listener going away."""


class Unreachable(Listener):
    """Closes every connection before TLS (HAProxy with no server in its pairing backend),
    then, from connection ``after`` on, hands over to ``then``."""

    def __init__(self, after: int, then: Scripted) -> None:
        self.then, self.after, self.seen = then, after, 0
        super().__init__()

    def serve(self, raw: socket.socket) -> None:
        self.seen += 1
        if self.seen < self.after:
            raw.close()
            return
        with socket.create_connection(("127.0.0.1", self.then.port)) as up:
            raw.settimeout(5)
            up.settimeout(5)
            pipe = threading.Thread(target=_copy, args=(up, raw), daemon=True)
            pipe.start()
            _copy(raw, up)
            pipe.join(5)
        raw.close()


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def test_the_first_connection_is_asked_again_while_nothing_answers(
    ca: pki.CA, listener: Callable[[list[Behaviour]], Scripted]
) -> None:
    # three connections closed before TLS, one that takes the request but never answers,
    # one "try again later", then the approval: one request in the end, the same each time
    srv = listener([close_before_answering, unavailable, approving(ca)])
    front = Unreachable(after=4, then=srv)
    try:
        req = pairing.prepare("agent.example", "ec-p256")
        said: list[str] = []
        pauses: list[float] = []
        session, reqid = pairing.submit_retrying(
            "127.0.0.1",
            front.port,
            req,
            {"port": 7443},
            60,
            say=said.append,
            sleep=pauses.append,
            jitter=lambda: 0.5,
        )
        result = session.wait(req)
        session.close()
    finally:
        front.close()
    assert reqid == "r1" and result["status"] == "approved"
    assert front.seen == 6 and len(srv.requests) == 3
    assert {(r["csr"], r["nonce"]) for r in srv.requests} == {(req.csr, req.nonce)}
    assert pauses == [0.5, 1.0, 2.0, 4.0, 8.0]  # growing, capped at BACKOFF_MAX
    assert all("asking again" in m for m in said) and len(said) == 5
    assert "cannot connect" in said[0] and "pairing unavailable" in said[-1]


def test_the_first_connection_gives_up_when_the_time_is_up(
    listener: Callable[[list[Behaviour]], Scripted],
) -> None:
    srv = listener([unavailable])
    req = pairing.prepare("agent.example", "ec-p256")
    with pytest.raises(pairing.PairingError, match=r"pairing unavailable.*gave up after \d+ "
                                                   r"attempts in 3 s"):  # fmt: skip
        pairing.submit_retrying("127.0.0.1", srv.port, req, {}, 3, say=lambda m: None,
                                sleep=lambda p: time.sleep(min(p, 0.6)))  # fmt: skip
    assert 2 <= len(srv.requests) <= 5


def test_the_first_connection_is_not_asked_again_when_final(
    listener: Callable[[list[Behaviour]], Scripted],
) -> None:
    def duplicate(s: ssl.SSLSocket, req: dict[str, Any]) -> None:
        s.sendall(response_bytes(200, {"status": "error", "reason": "duplicate request"}))

    srv = listener([duplicate])
    req = pairing.prepare("agent.example", "ec-p256")
    pauses: list[float] = []
    with pytest.raises(pairing.PairingError, match="pairing refused: duplicate request"):
        pairing.submit_retrying("127.0.0.1", srv.port, req, {}, 60, say=lambda m: None,
                                sleep=pauses.append)  # fmt: skip
    assert pauses == [] and len(srv.requests) == 1
    # a pinned CA that does not match: nothing is sent, nothing asked again
    with pytest.raises(pairing.PairingError, match="nothing was sent"):
        pairing.submit_retrying("127.0.0.1", srv.port, req, {}, 60, ca_pin="AA" * 32,
                                say=lambda m: None, sleep=pauses.append)  # fmt: skip
    assert pauses == [] and len(srv.requests) == 1


def test_reconnects_are_bounded_by_the_time_not_a_few_tries(
    ca: pki.CA, listener: Callable[[list[Behaviour]], Scripted]
) -> None:
    # twelve refusals in a row (a rate limit or a flapping leader check), then the approval:
    # within the approval timeout the agent waits it out
    srv = listener([pending_then_hang_up] + [unavailable] * 12 + [approving(ca)])
    req = pairing.prepare("agent.example", "ec-p256")
    session = pairing.Session("127.0.0.1", srv.port, timeout=10)
    session.submit(req, {})
    pauses: list[float] = []
    result, last = pairing.wait_reconnecting(session, req, {}, 600, say=lambda m: None,
                                             sleep=pauses.append)  # fmt: skip
    last.close()
    assert result["status"] == "approved" and len(srv.requests) == 14
    assert len(pauses) == 13 and max(pauses) == pairing.BACKOFF_MAX
