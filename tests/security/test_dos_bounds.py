"""Denial of service by unauthenticated (or merely CA-signed) input: every attack gets a
clear, bounded answer and leaves the service answering others.

A real ``ctrl-exec-api`` daemon (TLS, PROXY v2 listener) and real agents. Each refusal
prints ``[attack] <name>: refused (<detail>)``; every wait is bounded in count and time.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent.common.wire import MAX_JSON_DEPTH, parse_response, request_bytes
from dispatcher.api import proxyproto as pp
from dispatcher.client.blocking import BLOCKING
from dispatcher.client.io import run_blocking
from dispatcher.operations import Caller, do_ping
from dispatcher.pki import ca as dpki
from dispatcher.registry import Registry
from ops.lab.agentproc import AgentProc
from ops.lab.apidaemon import Daemon, PairingCA, make_daemon
from ops.lab.dispatcherenv import DispatcherEnv, make_env
from ops.lab.net import client_ssl, free_port, http_get, wait_listening
from ops.lab.pki import Issued

pytestmark = pytest.mark.integration

HEADER_TIMEOUT = 2.0
PER_IP = 4


def attack(name: str, detail: str) -> None:
    print(f"[attack] {name}: refused ({detail})")


@pytest.fixture(autouse=True)
def _show_attacks(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    yield
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[attack]")]
    if lines:
        with capsys.disabled():
            print("", *lines, sep="\n")


# ----- the API daemon ------------------------------------------------------------------------


@dataclass
class Api:
    tmp: Path
    ca: PairingCA
    daemon: Daemon
    proxy_port: int
    operator: Issued

    def ctx(self) -> ssl.SSLContext:
        return client_ssl(self.ca.cert_path, self.operator)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.daemon.url, verify=self.ctx(), trust_env=False,
                            timeout=30)  # fmt: skip

    def tls(self, source: str = "127.0.0.1", header: bytes = b"", port: int = 0) -> ssl.SSLSocket:
        """A TLS connection to the API port (or ``port``), optionally after a PROXY header."""
        raw = socket.create_connection(("127.0.0.1", port or self.daemon.api_port), timeout=10,
                                       source_address=(source, 0))  # fmt: skip
        if header:
            raw.sendall(header)
        return self.ctx().wrap_socket(raw)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("dos-api")
    ca_dir = tmp / "ca"
    ca = PairingCA(ca_dir)
    dpki.issue_dispatcher_cert(ca.ca, ca_dir / "dispatcher.crt", ca_dir / "dispatcher.key")
    api_cert, api_key = tmp / "api.crt", tmp / "api.key"
    dpki.issue_dispatcher_cert(ca.ca, api_cert, api_key)
    registry = tmp / "agents"
    Registry(registry).register("web1", ip="127.0.0.9", port=free_port(), lookup_by="ip")
    proxy_port = free_port()
    daemon = make_daemon(tmp, "dos", ca_dir, registry, {
        "api_cert": str(api_cert), "api_key": str(api_key), "api_client_ca": str(ca.cert_path),
        "api_auth_default": "allow", "api_proxy_port": str(proxy_port),
        "api_proxy_sources": "127.0.0.1", "api_header_timeout": str(HEADER_TIMEOUT),
        "api_max_conns_per_ip": str(PER_IP),
    })  # fmt: skip
    daemon.start()
    try:
        daemon.wait_healthy()
        yield Api(tmp, ca, daemon, proxy_port, ca.issue("op-alice", "alice"))
    finally:
        rc = daemon.stop()
    assert rc == 0, daemon.logtext()[-3000:]


class HealthProbe(threading.Thread):
    """``GET /health`` every 20 ms; the slowest answer is what the attack cost others."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop_flag = threading.Event()
        self.worst = 0.0
        self.count = 0
        self.failed = 0

    def run(self) -> None:
        for _ in range(3000):  # bounded: at most about a minute
            if self.stop_flag.is_set():
                return
            t0 = time.monotonic()
            code, _ = http_get(f"{self.url}/health", 5)
            self.worst = max(self.worst, time.monotonic() - t0)
            self.count += 1
            self.failed += code != 200
            time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        self.join(10)


def test_40000_hosts_refused_fast_while_health_answers(api: Api) -> None:
    hosts = [f"host-{i:05d}.example.net" for i in range(40_000)]
    with api.client() as c, HealthProbe(api.daemon.health_url) as probe:
        time.sleep(0.1)
        t0 = time.monotonic()
        r = c.post("/run", json={"hosts": hosts, "script": "x"})
        took = time.monotonic() - t0
        r2 = c.post("/ping", json={"hosts": hosts})
        time.sleep(0.1)
    assert r.status_code == 400, r.text
    assert "too many hosts (max 5000)" in r.text
    assert r2.status_code == 400 and "too many hosts" in r2.text
    assert took < 5, took
    assert probe.count >= 3 and probe.failed == 0
    assert probe.worst < 0.5, f"/health took {probe.worst:.3f} s during the attack"
    attack("run-with-40000-hosts",
           f"400 in {took * 1000:.0f} ms; slowest /health meanwhile {probe.worst * 1000:.0f} ms")  # fmt: skip


def test_many_unknown_hosts_under_max_hosts_resolve_linearly(api: Api) -> None:
    hosts = [f"ghost-{i:04d}" for i in range(4_999)]
    with api.client() as c, HealthProbe(api.daemon.health_url) as probe:
        t0 = time.monotonic()
        r = c.post("/run", json={"hosts": hosts, "script": "x"})
        took = time.monotonic() - t0
    assert r.status_code == 404, r.text
    detail = r.json()
    assert "(and 4979 more)" in json.dumps(detail) and len(r.content) < 2000
    assert took < 5 and probe.failed == 0 and probe.worst < 0.5, (took, probe.worst)
    attack("run-with-4999-unknown-hosts", f"404 in {took * 1000:.0f} ms, answer {len(r.content)} B")


def _closed_within(s: ssl.SSLSocket, limit: float) -> float | None:
    """Seconds until the server closed ``s`` (None if it was still open after ``limit``)."""
    t0 = time.monotonic()
    s.settimeout(0.25)
    while time.monotonic() - t0 < limit:
        try:
            if s.recv(4096) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except (ssl.SSLError, OSError):
            return time.monotonic() - t0
    return None


def test_partial_header_is_closed_after_the_header_timeout(api: Api) -> None:
    with api.tls() as partial, api.tls() as silent:
        partial.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        closed = _closed_within(partial, HEADER_TIMEOUT + 10)
        quiet = _closed_within(silent, HEADER_TIMEOUT + 10)
    assert closed is not None and HEADER_TIMEOUT - 0.5 < closed < HEADER_TIMEOUT + 10
    assert quiet is not None
    # a kept-alive connection that starts a second request and stalls is closed too
    with api.tls() as keep:
        keep.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = keep.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        keep.sendall(b"GET /health HTTP/1.1\r\nHo")
        again = _closed_within(keep, HEADER_TIMEOUT + 10)
    assert again is not None
    with api.client() as c:
        assert c.get("/health").status_code == 200
    attack("slow-header-tls", f"closed after {closed:.1f} s (api_header_timeout {HEADER_TIMEOUT})")


def test_per_ip_connection_cap_counts_the_real_address(api: Api) -> None:
    held = [api.tls(source="127.0.0.5") for _ in range(PER_IP)]
    try:
        extra = api.tls(source="127.0.0.5")
        gone = _closed_within(extra, 3)
        extra.close()
        assert gone is not None, "a connection over the per-IP cap stayed open"
        # another address is served meanwhile
        with api.tls(source="127.0.0.6") as other:
            other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert other.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()

    # behind the load balancer the cap counts the PROXY v2 address, not the balancer's
    def via_proxy(ip: str) -> ssl.SSLSocket:
        header = pp.build((ip, 40000), ("127.0.0.1", api.proxy_port))
        return api.tls(header=header, port=api.proxy_port)

    held = [via_proxy("10.9.9.9") for _ in range(PER_IP)]
    try:
        extra = via_proxy("10.9.9.9")
        gone = _closed_within(extra, 3)
        extra.close()
        assert gone is not None
        with via_proxy("10.9.9.10") as other:
            other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert other.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()
    assert "ACTION=api-conn-refused" in api.daemon.logtext()
    attack("connection-flood-one-ip", f"connection {PER_IP + 1} closed at once; others served")


def test_deep_json_and_long_reqid_are_clear_400_404(api: Api) -> None:
    depth = MAX_JSON_DEPTH + 1
    deep = b'{"hosts":["web1"],"script":"x","args":' + b"[" * depth + b"]" * depth + b"}"
    with api.client() as c:
        for body in (deep, b"[" * 500_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
            r = c.post("/run", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text[:300]
            assert f"deeper than {MAX_JSON_DEPTH}" in r.text and "Traceback" not in r.text
        r = c.get("/status/" + "a" * 300)
        assert r.status_code == 404 and "/" not in r.json().get("error", "")
        assert str(api.tmp) not in r.text and "runs" not in r.text
    assert "Traceback" not in api.daemon.logtext()
    attack("deep-json-api", f"400 (JSON nested deeper than {MAX_JSON_DEPTH})")
    attack("long-reqid-api", "404 without a path")


# ----- the agent -------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> Iterator[DispatcherEnv]:
    e = make_env(tmp_path)
    try:
        yield e
    finally:
        e.stop_all()


def _agent(env: DispatcherEnv, name: str, **conf: str) -> AgentProc:
    agent = env.add_agent(name, start=False)
    with agent.config.open("a") as f:
        f.write("".join(f"{k} = {v}\n" for k, v in conf.items()))
    agent.start()
    return agent


def _silent(host: str, port: int, sources: list[str], each: int) -> list[socket.socket]:
    socks = []
    for src in sources:
        for _ in range(each):
            s = socket.socket()
            s.bind((src, 0))
            s.settimeout(5)
            s.connect((host, port))
            socks.append(s)
    return socks


def _ping_ms(env: DispatcherEnv, name: str) -> tuple[str, float]:
    t0 = time.monotonic()
    out = run_blocking(do_ping(env.d, Caller("cli"), [name], io=BLOCKING))
    return str(out["results"][0].get("status")), (time.monotonic() - t0) * 1000


def test_agent_silent_connects_from_one_ip_leave_dispatchers_served(env: DispatcherEnv) -> None:
    agent = _agent(env, "flood.test", handshake_timeout="30")
    socks = _silent(agent.host, agent.port, ["127.0.0.2"], 256)
    try:
        time.sleep(1.0)  # the agent has accepted (and mostly closed) them all
        closed = 0
        for s in socks:
            s.settimeout(0.01)
            try:
                closed += s.recv(1) == b""
            except TimeoutError:
                pass
            except OSError:
                closed += 1
        status, ms = _ping_ms(env, "flood.test")
    finally:
        for s in socks:
            s.close()
    assert closed >= 256 - 8 - 2, closed  # all but max_conns_per_ip closed at once
    assert status == "ok" and ms < 3000, (status, ms)
    assert "ACTION=conn-cap" in agent.logtext()
    attack("agent-256-silent-connects-one-ip",
           f"{closed} closed before TLS; dispatcher ping ok in {ms:.0f} ms")  # fmt: skip


def test_agent_reserve_keeps_slots_for_a_known_dispatcher(env: DispatcherEnv) -> None:
    agent = _agent(env, "reserve.test", handshake_timeout="30", max_children="40",
                   dispatcher_reserved_slots="8")  # fmt: skip
    assert _ping_ms(env, "reserve.test")[0] == "ok"  # the dispatcher's address is now known
    # many addresses (the per-IP cap does not help): every unreserved slot is taken
    sources = [f"127.0.1.{i}" for i in range(1, 11)]
    socks = _silent(agent.host, agent.port, sources, 8)
    try:
        time.sleep(1.0)
        status, ms = _ping_ms(env, "reserve.test")
        # a newcomer (not a known dispatcher address) gets no slot meanwhile
        with socket.create_connection((agent.host, agent.port), 5,
                                      source_address=("127.0.2.1", 0)) as probe:  # fmt: skip
            probe.settimeout(3)
            refused = probe.recv(1) == b""
    finally:
        for s in socks:
            s.close()
    assert status == "ok" and ms < 3000, (status, ms)
    assert refused
    attack("agent-slot-exhaustion-many-ips",
           f"reserve kept: dispatcher ping ok in {ms:.0f} ms, newcomer closed")  # fmt: skip


def test_agent_deep_json_long_reqid_and_untrusted_renew(env: DispatcherEnv) -> None:
    agent = _agent(env, "bounds.test")
    wait_listening(agent.host, agent.port, agent.proc)
    who = env.installed
    depth = MAX_JSON_DEPTH + 1
    deep = b'{"script":"true","args":' + b"[" * depth + b"]" * depth + b"}"
    raw = agent.raw(
        b"POST /run HTTP/1.0\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(deep)}\r\n\r\n".encode() + deep, who)  # fmt: skip
    resp = parse_response(raw)
    assert resp.code == 400 and f"deeper than {MAX_JSON_DEPTH}" in resp.body.decode()
    resp = agent.call("GET", "/result/" + "a" * 300, None, who)
    assert resp.code == 404 and b"/" not in resp.body
    # /renew and /renew-complete: a CA-signed certificate the trust map does not list
    stranger = env.ca.issue("stranger", cn="stranger.test")
    staged = Path(agent.state_dir) / "agent.crt.staged"
    for path, body in (("/renew", {"reqid": "r1"}),
                       ("/renew-complete", {"cert": "x", "ca": "", "reqid": "r1"})):  # fmt: skip
        data = agent.raw(request_bytes("POST", path, body, host=agent.host), stranger)
        resp = parse_response(data)
        assert resp.code == 403, (path, resp)
        assert b"csr" not in resp.body
        attack(f"untrusted-cert-{path.strip('/')}", f"403 {resp.body.decode()}")
    assert not staged.exists()
    assert "Traceback" not in agent.logtext()
    attack("deep-json-agent", f"400 (JSON nested deeper than {MAX_JSON_DEPTH})")


def test_metrics_expose_the_pin_counters(api: Api) -> None:
    with api.client() as c:
        text = c.get("/metrics").text
    assert "ctrl_exec_agent_pin_mismatches_total 0.0" in text
    assert "ctrl_exec_agent_unpinned_total" in text
