"""Attacks on the pairing listener's PROXY v2 port (``pairing_proxy_port``).

Behind HAProxy every agent reaches the pairing listener from the load balancer's address;
``send-proxy-v2`` tells the listener the real client, so the rate limit, the per-source
cap and ``list-requests`` are per agent. The header is believed only from
``api_proxy_sources``: a client that reaches the port directly cannot choose its address.
Each refusal must change nothing and prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.common.tlsconf import client_context
from agent.common.wire import dumps
from dispatcher.config import DispatcherConfig
from dispatcher.haproxy import Member
from dispatcher.pairing import queue as pq
from dispatcher.pki import ca as pki
from dispatcher.proxyv2 import build
from dispatcher.registry import Registry
from ops.lab.haproxy import HAPROXY, PAIRING_BACKEND, HAProxy
from ops.lab.haproxy import SKIP_REASON as HAPROXY_SKIP
from ops.lab.healthstub import HealthStub
from ops.lab.net import free_port
from ops.lab.pairing import frame, read_response
from ops.lab.proc import wait_until
from tests.integration.test_pairing import Events, Listener, request_body
from tests.security.test_pairing_attacks import (
    _show_attacks,
    ask,
    attack,
    open_pairing,
    snapshot,
)

__all__ = ["_show_attacks"]  # autouse: the [attack] lines reach the output

pytestmark = pytest.mark.integration


def proxy_cfg(root: Path, sources: str = "127.0.0.1", **kw: object) -> DispatcherConfig:
    c = DispatcherConfig(ca_dir=str(root / "etc"), state_dir=str(root / "state"),
                         dispatcher_id="disp-test", pairing_proxy_port=free_port(),
                         api_proxy_sources=[sources], **kw).finish()  # type: ignore[arg-type]  # fmt: skip
    pki.issue_dispatcher_cert(pki.create_ca(c.ca_dir), c.cert, c.key)
    return c


def through_header(port: int, header: bytes, body: dict[str, object],
                   source: str = "127.0.0.1") -> dict[str, object] | None:  # fmt: skip
    """Connect to the PROXY port from ``source``, send ``header`` then a pairing request
    over TLS; the answer, or None when the listener closed the connection unanswered."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    try:
        raw.sendall(header)
        with client_context(None).wrap_socket(raw) as s:
            s.sendall(frame(dumps(body)))
            with s.makefile("rb") as fh:
                _, _, data = read_response(fh)
        answer: dict[str, object] = json.loads(data)
        return answer
    except (OSError, ssl.SSLError, AssertionError):
        return None
    finally:
        raw.close()


def test_header_from_an_untrusted_source_is_refused(
    tmp_path: Path, listen: Callable[..., Listener], events: Events
) -> None:
    c = proxy_cfg(tmp_path, sources="127.0.0.9", pairing_rate_limit_disable=True)
    lst = listen(c)
    assert lst.server.proxy_port == c.pairing_proxy_port
    before = snapshot(c.pairing_dir, c.registry_dir)
    forged = build(("198.51.100.7", 40000), ("127.0.0.1", lst.server.proxy_port))
    assert through_header(lst.server.proxy_port, forged, request_body("forged.example")) is None
    assert snapshot(c.pairing_dir, c.registry_dir) == before
    wait_until(lambda: events.has("pairing-proxy-refuse", peer="127.0.0.1"), 5, "log")
    attack("proxy-header-from-untrusted-source", "127.0.0.1 is not in api_proxy_sources: "
           "closed before a byte was read")  # fmt: skip
    # the plain port still serves that client, as itself
    answer = ask(lst.port, request_body("direct.example"))
    assert answer["status"] == "pending"
    rec = pq.get_request(c.pairing_dir, str(answer["reqid"]))
    assert rec is not None and rec["source_ip"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("label", "header"),
    [
        ("no-header", b""),
        ("proxy-v1-text", b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 7444\r\n"),
        ("oversized-header", build(("198.51.100.7", 40000))[:14] + b"\xff\xff"),
    ],
)  # fmt: skip
def test_bad_header_from_a_trusted_source_is_refused(
    tmp_path: Path, listen: Callable[..., Listener], events: Events, label: str, header: bytes
) -> None:
    c = proxy_cfg(tmp_path, pairing_rate_limit_disable=True)
    lst = listen(c, handshake_timeout=1.0)
    before = snapshot(c.pairing_dir, c.registry_dir)
    assert through_header(lst.server.proxy_port, header, request_body("bad.example")) is None
    assert snapshot(c.pairing_dir, c.registry_dir) == before
    wait_until(lambda: events.has("pairing-proxy-reject", peer="127.0.0.1"), 5, "log")
    attack(f"pairing-proxy-{label}", "connection closed before TLS")


def test_truncated_header_is_refused(
    tmp_path: Path, listen: Callable[..., Listener], events: Events
) -> None:
    """A header cut short (the sender stops): closed, nothing queued."""
    c = proxy_cfg(tmp_path, pairing_rate_limit_disable=True)
    lst = listen(c)
    before = snapshot(c.pairing_dir, c.registry_dir)
    with socket.create_connection(("127.0.0.1", lst.server.proxy_port), timeout=10) as raw:
        raw.sendall(build(("198.51.100.7", 40000))[:20])
        raw.shutdown(socket.SHUT_WR)
        assert raw.recv(100) == b""
    wait_until(lambda: events.has("pairing-proxy-reject", peer="127.0.0.1"), 5, "log")
    assert snapshot(c.pairing_dir, c.registry_dir) == before
    attack("pairing-proxy-truncated-header", "connection closed before TLS")


@pytest.fixture
def behind_haproxy(tmp_path: Path, listen: Callable[..., Listener]
                   ) -> Iterator[tuple[DispatcherConfig, Listener, HAProxy]]:  # fmt: skip
    if HAPROXY is None:
        pytest.skip(HAPROXY_SKIP)
    c = proxy_cfg(tmp_path)  # the default rate limit: 10 connections a minute per client
    lst = listen(c)
    health = HealthStub().start()
    member = Member("p1", "127.0.0.1", api_port=free_port(), health_port=health.port,
                    pairing_port=lst.port, pairing_proxy_port=lst.server.proxy_port)  # fmt: skip
    hap = HAProxy(tmp_path / "haproxy", [member], proxy_protocol=True)
    try:
        assert f"127.0.0.1:{lst.server.proxy_port} send-proxy-v2" in hap.render()
        hap.start()
        hap.wait_status(PAIRING_BACKEND, {"p1": "UP"})
        yield c, lst, hap
    finally:
        hap.stop()
        health.stop()


def test_one_client_flooding_through_haproxy_does_not_block_another(
    behind_haproxy: tuple[DispatcherConfig, Listener, HAProxy], events: Events
) -> None:
    c, _lst, hap = behind_haproxy
    flooder, other = "127.0.0.21", "127.0.0.22"
    bad = {"hostname": "x"}  # answered (invalid request), counted by the limiter
    for _ in range(10):
        assert ask(hap.pairing_port, bad, flooder)["status"] == "error"
    before = snapshot(c.pairing_dir, c.registry_dir)
    with pytest.raises((ssl.SSLError, OSError, AssertionError)):
        ask(hap.pairing_port, request_body("flooder.example"), flooder)  # the 11th
    assert snapshot(c.pairing_dir, c.registry_dir) == before
    assert events.has("rate-block", ip=flooder, reason="volume")
    attack("pairing-flood-through-haproxy", f"{flooder} blocked after 10 connects, "
           "connection closed unanswered")  # fmt: skip
    s, fh, first = open_pairing(hap.pairing_port, request_body("other.example"), other)
    with s, fh:
        assert first["status"] == "pending", first
        listed = pq.describe(pq.list_pending(c.pairing_dir), _registry(c))
        assert [(r["hostname"], r["source_ip"]) for r in listed] == [("other.example", other)]


def _registry(c: DispatcherConfig) -> Registry:
    return Registry(c.registry_dir)
