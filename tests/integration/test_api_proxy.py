"""PROXY protocol v2 between a real HAProxy (TCP passthrough) and a real ``ctrl-exec-api``.

HAProxy sends ``send-proxy-v2`` to the instance's ``api_proxy_port``; the instance serves
TLS with operator client certificates behind it and calls an auth hook that records
``ENVEXEC_SOURCE_IP``. A client bound to 127.0.0.5 must appear as 127.0.0.5 (not as
HAProxy's 127.0.0.1) in the auth hook and in the ``api-request`` log line; a client that
reaches the PROXY port directly from an untrusted address is closed before anything it
sends is read, so it cannot claim an address.
"""

from __future__ import annotations

import socket
import ssl
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from dispatcher.api import proxyproto as pp
from dispatcher.haproxy import Member
from dispatcher.pki import ca as dpki
from ops.lab.apidaemon import Daemon, PairingCA, make_daemon
from ops.lab.haproxy import API_BACKEND, HAProxy
from ops.lab.net import free_port
from ops.lab.operators import OperatorCA
from ops.lab.pki import Issued, TestCA
from tests.support.haproxy import Factory, haproxy_factory, needs_haproxy

__all__ = ["haproxy_factory"]  # the fixture, imported for this module's tests

pytestmark = [pytest.mark.integration, needs_haproxy]

CLIENT_IP = "127.0.0.5"
HOOK = """#!/bin/sh
echo "$ENVEXEC_ACTION $ENVEXEC_SOURCE_IP $ENVEXEC_USERNAME" >> "$(dirname "$0")/hook.log"
exit 0
"""


@dataclass
class Env:
    tmp: Path
    ca: PairingCA
    daemon: Daemon
    proxy_port: int
    hook_log: Path
    alice: Issued

    def ctx(self, who: Issued | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_path))
        ctx.check_hostname = False
        if who is not None:
            ctx.load_cert_chain(str(who.cert), str(who.key))
        return ctx

    def client(self, base_url: str, source: str = CLIENT_IP,
               who: Issued | None = None) -> httpx.Client:  # fmt: skip
        transport = httpx.HTTPTransport(verify=self.ctx(who), local_address=source)
        return httpx.Client(base_url=base_url, transport=transport, trust_env=False, timeout=10)

    def hook_lines(self) -> list[str]:
        return self.hook_log.read_text().splitlines() if self.hook_log.exists() else []

    def log_lines(self, action: str) -> list[str]:
        return [ln for ln in self.daemon.logtext().splitlines() if f"ACTION={action} " in ln]

    def wait_lines(self, action: str, needle: str = "", count: int = 1,
                   timeout: float = 5) -> list[str]:  # fmt: skip
        """The ``action`` log lines containing ``needle``, once there are ``count`` of them
        (the daemon logs through a queue, so a line can trail the answer by a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [ln for ln in self.log_lines(action) if needle in ln]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("api-proxy")
    ca_dir = tmp / "ca"
    ca = PairingCA(ca_dir)
    operators = OperatorCA(ca_dir, tmp / "operators")  # trusted without configuration
    dpki.issue_dispatcher_cert(ca.ca, ca_dir / "dispatcher.crt", ca_dir / "dispatcher.key")
    api_cert, api_key = tmp / "api.crt", tmp / "api.key"
    dpki.issue_dispatcher_cert(ca.ca, api_cert, api_key)
    hooks = tmp / "hooks"
    hooks.mkdir()
    hook = hooks / "auth-hook"
    hook.write_text(HOOK)
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    proxy_port = free_port()
    daemon = make_daemon(tmp, "px", ca_dir, tmp / "agents", {
        "api_cert": str(api_cert), "api_key": str(api_key),
        "auth_hook": str(hook),
        "api_proxy_port": str(proxy_port), "api_proxy_sources": "127.0.0.1, ::1",
    })  # fmt: skip
    daemon.start()
    try:
        daemon.wait_healthy()
        yield Env(tmp, ca, daemon, proxy_port, hooks / "hook.log", operators.issue("alice"))
    finally:
        rc = daemon.stop()
    assert rc == 0, daemon.logtext()


@pytest.fixture
def hap(env: Env, haproxy_factory: Factory) -> HAProxy:
    d = env.daemon
    member = Member("i1", "127.0.0.1", d.api_port, d.health_port, free_port(), env.proxy_port)
    h = haproxy_factory([member], proxy_protocol=True)
    h.wait_status(API_BACKEND, {"i1": "UP"})
    return h


def test_listener_is_announced(env: Env) -> None:
    (line,) = env.log_lines("api-proxy-start")
    assert f"PORT={env.proxy_port}" in line and "SOURCES=127.0.0.1/32,::1/128" in line


def test_real_client_address_through_haproxy(env: Env, hap: HAProxy) -> None:
    assert f"127.0.0.1:{env.proxy_port} send-proxy-v2" in hap.config.read_text()
    before = len(env.hook_lines())
    with env.client(hap.api_url, who=env.alice) as c:
        for _ in range(2):  # two requests on one kept-alive connection
            r = c.post("/ping", json={"hosts": ["nosuch"], "username": "ops"})
            assert r.status_code == 404, r.text  # authorised, then an unknown agent
    hook = env.hook_lines()[before:]
    # the username is the operator certificate's CN, not the body's "ops" (logged)
    assert hook.count(f"api {CLIENT_IP} alice") == 2, hook
    assert env.wait_lines("username-ignored", "BODY_USERNAME=ops", 2), env.daemon.logtext()
    assert not any(" 127.0.0.1 " in ln for ln in hook), hook
    reqs = env.wait_lines("api-request", "PATH=/ping", 2)
    assert len(reqs) == 2
    for ln in reqs:
        assert f"PEER={CLIENT_IP}" in ln and "VIA=127.0.0.1" in ln and "IDENTITY=alice" in ln
    auth = env.wait_lines("auth", f"IP={CLIENT_IP}")
    assert auth, env.daemon.logtext()
    # HAProxy's own log shows the connection came from the client address
    deadline = time.monotonic() + 5
    while f"{CLIENT_IP}:" not in hap.logtext() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"{CLIENT_IP}:" in hap.logtext()


def test_direct_api_port_still_sees_the_tcp_peer(env: Env) -> None:
    before = len(env.hook_lines())
    with env.client(env.daemon.url, source="127.0.0.6", who=env.alice) as c:
        assert c.get("/").status_code == 200
    assert env.hook_lines()[before:] == ["api 127.0.0.6 alice"]  # the certificate's CN
    last = env.wait_lines("api-request", "PEER=127.0.0.6")
    assert last and "VIA=" not in last[-1]


def _raw(source: str, port: int, data: bytes) -> bytes:
    """Connect from ``source``, send ``data``, return what comes back until EOF/reset."""
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        out = b""
        try:
            s.sendall(data)
            while chunk := s.recv(4096):
                out += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        return out


def test_untrusted_source_is_refused_on_the_proxy_port(env: Env) -> None:
    before = len(env.hook_lines())
    forged = pp.build(("10.9.9.9", 1234), ("127.0.0.1", env.proxy_port))
    assert _raw(CLIENT_IP, env.proxy_port, forged) == b""
    with (
        env.client(f"https://127.0.0.1:{env.proxy_port}", who=env.alice) as c,
        pytest.raises(httpx.TransportError),
    ):
        c.get("/")
    assert env.hook_lines()[before:] == []
    refusals = env.wait_lines("api-proxy-refuse", f"PEER={CLIENT_IP}", 2)
    assert len(refusals) >= 2
    assert "10.9.9.9" not in env.daemon.logtext()


def test_malformed_header_from_a_trusted_source_closes(env: Env) -> None:
    assert _raw("127.0.0.1", env.proxy_port, b"GET / HTTP/1.0\r\n\r\n") == b""
    big = pp.SIGNATURE + b"\x21\x11\xff\xff"
    assert _raw("127.0.0.1", env.proxy_port, big) == b""
    assert env.wait_lines("api-proxy-reject", "bad signature"), env.daemon.logtext()
    assert env.wait_lines("api-proxy-reject", "too large"), env.daemon.logtext()


def test_trusted_proxy_header_is_believed_and_tls_still_checked(env: Env) -> None:
    # what HAProxy does, by hand: header, then TLS with the client's certificate
    before = len(env.hook_lines())
    ctx = env.ctx(env.alice)
    with socket.create_connection(("127.0.0.1", env.proxy_port), timeout=5) as raw:
        raw.sendall(pp.build(("192.0.2.44", 5000), ("127.0.0.1", env.proxy_port)))
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert env.hook_lines()[before:] == ["api 192.0.2.44 alice"]  # the certificate's CN
    # a certificate from another CA still fails the handshake; the log names the client
    stranger = TestCA(env.tmp / "stranger").issue("mallory", cn="mallory")
    with socket.create_connection(("127.0.0.1", env.proxy_port), timeout=5) as raw:
        raw.sendall(pp.build(("192.0.2.45", 5001), ("127.0.0.1", env.proxy_port)))
        got = b"?"
        try:  # TLS 1.3: the refusal shows on the first read (an alert or a closed socket)
            with env.ctx(stranger).wrap_socket(raw) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                got = s.recv(100)
        except (ssl.SSLError, OSError):
            got = b""
        assert got == b""
    failures = env.wait_lines("tls-failure", "PEER=192.0.2.45")
    assert failures and "VIA=127.0.0.1" in failures[0], env.daemon.logtext()


def test_drain_through_the_stats_socket(env: Env, hap: HAProxy) -> None:
    rows = hap.servers_state(API_BACKEND)
    assert [r["srv_name"] for r in rows] == ["i1"] and rows[0]["srv_op_state"] == "2"
    hap.drain(API_BACKEND, "i1")
    assert hap.wait_status(API_BACKEND, {"i1": "DRAIN"}) == {"i1": "DRAIN"}
    hap.set_state(API_BACKEND, "i1", "ready")
    hap.wait_status(API_BACKEND, {"i1": "UP"})
    with env.client(hap.api_url, who=env.alice) as c:
        assert c.get("/").status_code == 200


def test_daemon_refuses_a_bad_proxy_setup(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ca = PairingCA(ca_dir)
    dpki.issue_dispatcher_cert(ca.ca, ca_dir / "dispatcher.crt", ca_dir / "dispatcher.key")
    bad = make_daemon(tmp_path, "bad", ca_dir, tmp_path / "agents",
                      {"api_proxy_port": str(free_port()), "api_proxy_sources": "haproxy-1"})  # fmt: skip
    bad.start()
    assert bad.proc is not None and bad.proc.wait(30) == 78  # EX_CONFIG, file:line
    assert (
        f"{bad.config}:{_line(bad.config, 'api_proxy_sources')}: "
        "api_proxy_sources: 'haproxy-1' is not an address or network"
    ) in bad.logtext()
    assert "Traceback" not in bad.logtext()
    with socket.socket() as busy:  # the proxy port is taken: the instance does not serve
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = make_daemon(tmp_path, "taken", ca_dir, tmp_path / "agents",
                            {"api_proxy_port": str(busy.getsockname()[1])})  # fmt: skip
        taken.start()
        assert taken.proc is not None and taken.proc.wait(30) == 78  # a port in use: EX_CONFIG
        port = busy.getsockname()[1]
    assert (
        f"{taken.config}:{_line(taken.config, 'api_proxy_port')}: api_proxy_port {port}: "
        f"cannot listen on 127.0.0.1:{port}: Address already in use"
    ) in taken.logtext()
    assert "ACTION=api-start" not in taken.logtext() and "Traceback" not in taken.logtext()


def _line(config: Path, key: str) -> int:
    """The line of ``key`` in a config file."""
    lines = config.read_text().splitlines()
    return next(n for n, ln in enumerate(lines, 1) if ln.startswith(f"{key} ="))
