"""End-to-end pairing: the real agent CLI against a real :class:`PairingServer`.

The listener runs in a background event-loop thread on a free loopback port with a CA
and dispatcher cert made by :mod:`dispatcher.pki.ca`; agents are ``python -m agent.cli``
subprocesses. After approval the freshly paired agent is started for real and pinged
over mTLS with the dispatcher's certificate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from agent import trustmap
from agent.common import certs
from agent.common.logfmt import format_fields, logger
from agent.common.tlsconf import client_context
from agent.common.wire import dumps, parse_response, request_bytes
from dispatcher.config import DispatcherConfig
from dispatcher.pairing import queue as pq
from dispatcher.pairing.server import PairingServer
from dispatcher.pki import ca as pki
from dispatcher.registry import Registry
from dispatcher.statewrite import LocalWriter
from ops.lab.net import free_port, wait_listening
from ops.lab.pairing import frame, read_response
from ops.lab.proc import ENV, ROOT, wait_until

pytestmark = pytest.mark.integration
REQID_LINE = re.compile(r"^[a-f0-9]{16}$")


# ----- fixtures ------------------------------------------------------------------------


class CapturingWriter(LocalWriter):
    """Records what was written, so tests can compare delivered bytes to files."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def write(self, path: str | Path, data: bytes | str, mode: int = 0o644) -> None:
        self.data[Path(path).name] = data.encode() if isinstance(data, str) else data
        super().write(path, data, mode)


class Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def has(self, action: str, **fields: Any) -> bool:
        want = [format_fields(action, {})] + [format_fields("x", {k: v}).split(" ", 1)[1]
                                              for k, v in fields.items()]  # fmt: skip
        return any(line.split(" ")[0] == want[0] and all(w in line.split(" ") for w in want[1:])
                   for line in list(self.lines))  # fmt: skip


@pytest.fixture
def events() -> Iterator[Events]:
    h = Events()
    log = logger()
    old = log.level
    log.addHandler(h)
    log.setLevel(logging.INFO)
    yield h
    log.removeHandler(h)
    log.setLevel(old)


@pytest.fixture
def cfg(tmp_path: Path) -> DispatcherConfig:
    c = DispatcherConfig(
        path=str(tmp_path / "ctrl-exec.conf"), ca_dir=str(tmp_path / "etc"),
        state_dir=str(tmp_path / "state"), dispatcher_id="disp-test",
        pairing_rate_limit_disable=True,
    ).finish()  # fmt: skip
    ca = pki.create_ca(c.ca_dir)
    pki.issue_dispatcher_cert(ca, c.cert, c.key)
    return c


@dataclass
class Listener:
    server: PairingServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.server.server is not None:
            self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def listen() -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def start(cfg: DispatcherConfig, **kw: Any) -> Listener:
        kw.setdefault("poll_interval", 0.1)
        kw.setdefault("reverse_dns", False)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        requests: list[dict[str, Any]] = []
        server = PairingServer(cfg, host="127.0.0.1", port=0, on_request=requests.append, **kw)
        lst = Listener(server, loop, thread, requests)
        started.append(lst)
        lst.call(server.start())
        return lst

    yield start
    for lst in started:
        lst.close()


# ----- raw client ----------------------------------------------------------------------


def connect(port: int, timeout: float = 10) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return client_context(None).wrap_socket(raw)


def request_body(hostname: str = "raw.test", **extra: Any) -> dict[str, Any]:
    csr = certs.make_csr(certs.new_key("ec-p256"), hostname)
    return {"hostname": hostname, "csr": csr, "nonce": os.urandom(16).hex(), **extra}


def pair_raw(port: int, body: dict[str, Any]) -> tuple[ssl.SSLSocket, IO[bytes], dict[str, Any]]:
    s = connect(port)
    s.sendall(frame(dumps(body)))
    fh = s.makefile("rb")
    code, head, raw = read_response(fh)
    assert code == 200
    assert head.startswith(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n")
    return s, fh, json.loads(raw)


def one_shot(port: int, data: bytes) -> dict[str, Any]:
    with connect(port) as s:
        s.sendall(data)
        code, _, raw = read_response(s.makefile("rb"))
        assert code == 200
        obj = json.loads(raw)
        assert isinstance(obj, dict)
        return obj


# ----- the real agent ------------------------------------------------------------------


@dataclass
class AgentFiles:
    root: Path
    config: Path
    allowlist: Path
    port: int

    @property
    def cert(self) -> Path:
        return self.root / "etc" / "agent.crt"

    @property
    def key(self) -> Path:
        return self.root / "etc" / "agent.key"

    @property
    def ca(self) -> Path:
        return self.root / "etc" / "ca.crt"

    @property
    def trust_map(self) -> Path:
        return self.root / "state" / "ctrl-exec-dispatchers"


def agent_files(tmp: Path, key_type: str = "ec-p256", hostname: str = "agent1.test") -> AgentFiles:
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = {
        "port": str(port), "bind": "127.0.0.1", "cert": str(tmp / "etc" / "agent.crt"),
        "key": str(tmp / "etc" / "agent.key"), "ca": str(tmp / "etc" / "ca.crt"),
        "state_dir": str(tmp / "state"), "revoked_serials": str(tmp / "revoked"),
        "log_target": "stderr", "key_type": key_type, "hostname": hostname,
        "rate_limit_disable": "1",
    }  # fmt: skip
    config = tmp / "agent.conf"
    config.write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
    allow = tmp / "scripts.conf"
    allow.write_text("")
    return AgentFiles(tmp, config, allow, port)


def request_pairing(a: AgentFiles, port: int, background: bool = True,
                    timeout: int = 60, *extra: str) -> subprocess.Popen[bytes]:  # fmt: skip
    cmd = [
        sys.executable,
        "-m",
        "agent.cli",
        "request-pairing",
        "--config",
        str(a.config),
        "--dispatcher",
        "127.0.0.1",
        "--port",
        str(port),
        "--timeout",
        str(timeout),
        *extra,
    ]
    if background:
        cmd.append("--background")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(a.root / "pair.log", "ab"),
                            env=ENV, cwd=str(ROOT), start_new_session=True)  # fmt: skip


def read_until(proc: subprocess.Popen[bytes], pattern: re.Pattern[str],
               timeout: float = 30) -> tuple[str, list[str]]:  # fmt: skip
    """Lines of the agent's stdout up to the first that matches ``pattern``."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode().rstrip("\n")
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if pattern.match(line):
            return line, lines
    raise AssertionError(f"no line matching {pattern.pattern!r} in {lines!r}")


def ping(a: AgentFiles, cfg: DispatcherConfig) -> tuple[int, dict[str, Any]]:
    ctx = client_context(str(a.ca), cfg.cert, cfg.key)
    with (socket.create_connection(("127.0.0.1", a.port), timeout=10) as raw,
          ctx.wrap_socket(raw) as s):  # fmt: skip
        s.sendall(request_bytes("POST", "/ping", {"reqid": "00ff00ff00ff00ff"}, "127.0.0.1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    resp = parse_response(data)
    return resp.code, resp.json()


def full_pairing(tmp: Path, cfg: DispatcherConfig, lst: Listener, key_type: str) -> None:
    a = agent_files(tmp / "agent", key_type=key_type)
    proc = request_pairing(a, lst.port)
    try:
        reqid, lines = read_until(proc, REQID_LINE)
        assert proc.wait(15) == 0  # the parent returns once the reqid is printed
        printed = [ln.split(": ", 1)[1] for ln in lines if ln.startswith("Pairing code: ")]
        rec = pq.get_request(cfg.pairing_dir, reqid)
        assert rec is not None and rec["id"] == reqid
        assert re.fullmatch(r"\d{6}", rec["code"])
        assert printed == [rec["code"]] == [certs.pairing_code(rec["csr"])]
        assert rec["hostname"] == "agent1.test" and rec["port"] == a.port
        assert rec["ip"] == rec["source_ip"] == "127.0.0.1"
        wait_until(lambda: bool(lst.requests), 5, "on_request")
        assert lst.requests[0]["id"] == reqid and lst.requests[0]["code"] == rec["code"]
        assert not a.cert.exists()

        res = pq.approve(cfg, reqid)
        wait_until(lambda: a.trust_map.exists() and a.cert.exists(), 20, "agent to store certs")
        wait_until(lambda: not Path(cfg.pairing_dir, f"{reqid}.json").exists(), 5, "cleanup")
        assert not Path(cfg.pairing_dir, f"{reqid}.approved").exists()
        serial = pki.cert_serial_hex(cfg.cert)
        assert res.dispatcher_serial == serial
        assert trustmap.load(a.trust_map)[0] == {serial: "disp-test"}
        assert f"{serial} disp-test" in a.trust_map.read_text().splitlines()
        assert a.ca.read_bytes() == Path(cfg.ca).read_bytes()
        assert a.cert.read_text() == res.cert
        reg = Registry(cfg.registry_dir).get("agent1.test")
        assert reg is not None and reg["port"] == a.port and reg["reqid"] == reqid
        assert reg["expiry"] == certs.cert_expiry(a.cert)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    # the freshly paired agent serves, and trusts the approving dispatcher
    serve = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "serve", "--config", str(a.config),
         "--allowlist", str(a.allowlist)],
        stdout=subprocess.DEVNULL, stderr=open(a.root / "serve.log", "ab"),  # noqa: SIM115
        env=ENV, cwd=str(ROOT), start_new_session=True,
    )  # fmt: skip
    try:
        wait_listening("127.0.0.1", a.port, serve)
        code, body = ping(a, cfg)
        assert code == 200, body
        assert body["status"] == "ok" and body["host"] == "agent1.test"
        assert body["reqid"] == "00ff00ff00ff00ff"
    finally:
        serve.terminate()
        serve.wait(10)


# ----- tests ---------------------------------------------------------------------------


def test_pair_approve_then_ping(
    tmp_path: Path, cfg: DispatcherConfig, listen: Callable[..., Listener], events: Events
) -> None:
    lst = listen(cfg)
    full_pairing(tmp_path, cfg, lst, "ec-p256")
    assert events.has("pair-request", agent="agent1.test", status="pending")
    assert events.has("pair-approve", agent="agent1.test")


def test_pair_rsa_2048(
    tmp_path: Path, cfg: DispatcherConfig, listen: Callable[..., Listener]
) -> None:
    full_pairing(tmp_path, cfg, listen(cfg), "rsa-2048")


def test_deny_makes_the_agent_exit_3(
    tmp_path: Path, cfg: DispatcherConfig, listen: Callable[..., Listener], events: Events
) -> None:
    lst = listen(cfg)
    a = agent_files(tmp_path / "agent")
    proc = request_pairing(a, lst.port, background=False)
    try:
        read_until(proc, re.compile(r"^Connecting to ctrl-exec"))
        wait_until(lambda: bool(pq.list_pending(cfg.pairing_dir)), 15, "queued request")
        (rec,) = pq.list_pending(cfg.pairing_dir)
        pq.deny(cfg, rec["id"])
        assert proc.wait(15) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
    assert "rejected by operator" in (a.root / "pair.log").read_text()
    assert not a.cert.exists() and not a.key.exists() and not a.trust_map.exists()
    wait_until(lambda: not list(Path(cfg.pairing_dir).glob(f"{rec['id']}.*")), 5, "cleanup")
    assert events.has("pair-deny", reqid=rec["id"])


def test_nonce_is_echoed_and_approval_delivered_verbatim(
    cfg: DispatcherConfig, listen: Callable[..., Listener]
) -> None:
    w = CapturingWriter()
    lst = listen(cfg, writer=w)
    body = request_body("verbatim.test", port=9443, lookup_by="ip", ip="192.0.2.10")
    s, fh, first = pair_raw(lst.port, body)
    with s, fh:
        assert first["status"] == "pending" and REQID_LINE.match(first["reqid"])
        rid = first["reqid"]
        rec = pq.get_request(cfg.pairing_dir, rid)
        assert rec is not None and rec["nonce"] == body["nonce"]
        assert rec["ip"] == "192.0.2.10" and rec["source_ip"] == "127.0.0.1"
        res = pq.approve(cfg, rid, writer=w)
        assert (res.lookup_by, res.port, res.ip) == ("ip", 9443, "192.0.2.10")
        code, _, raw = read_response(fh)
        assert code == 200
        assert raw == w.data[f"{rid}.approved"]
        second = json.loads(raw)
        assert second["status"] == "approved" and second["nonce"] == body["nonce"]
        assert second["dispatcher_id"] == "disp-test"
        assert second["dispatcher_serial"] == pki.cert_serial_hex(cfg.cert)
        assert s.recv(1) == b""  # then the server closes


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"POST /pair HTTP/1.0\r\nContent-Length: 9\r\n\r\nnot json!", "invalid request"),
        (b"GET / HTTP/1.0\r\nContent-Length: 2\r\n\r\n[]", "invalid request"),
        (b'POST /pair HTTP/1.0\r\nContent-Length: 16\r\n\r\n{"hostname":"h"}', "invalid request"),
        (b"POST /pair HTTP/1.0\r\n\r\n", "invalid request"),
    ],
)
def test_invalid_requests(
    cfg: DispatcherConfig, listen: Callable[..., Listener], data: bytes, reason: str
) -> None:
    lst = listen(cfg)
    assert one_shot(lst.port, data) == {"status": "error", "reason": reason}
    assert pq.count(cfg.pairing_dir) == 0


def test_invalid_hostname_and_oversized_body(
    cfg: DispatcherConfig, listen: Callable[..., Listener], events: Events
) -> None:
    lst = listen(cfg)
    bad = frame(dumps(request_body("-bad")))
    assert one_shot(lst.port, bad) == {"status": "error", "reason": "invalid hostname"}
    big = frame(dumps({**request_body(), "pad": "x" * 70_000}))
    assert one_shot(lst.port, big) == {"status": "error", "reason": "request too large"}
    huge_head = b"POST /pair HTTP/1.0\r\n" + b"X-Pad: " + b"y" * 70_000 + b"\r\n\r\n"
    assert one_shot(lst.port, huge_head)["reason"] == "request too large"
    # exactly at the cap is still read (and then judged on its content)
    at_cap = b"{" + b" " * (65_536 - 2) + b"}"
    assert one_shot(lst.port, frame(at_cap))["reason"] == "invalid request"
    assert pq.count(cfg.pairing_dir) == 0
    wait_until(lambda: events.has("pair-reject", reason="body-too-large"), 5, "log")
    assert events.has("pair-reject", reason="invalid-hostname")


def test_queue_full(tmp_path: Path, listen: Callable[..., Listener], events: Events) -> None:
    c = DispatcherConfig(ca_dir=str(tmp_path / "etc"), state_dir=str(tmp_path / "state"),
                         pairing_max_queue=2, pairing_rate_limit_disable=True).finish()  # fmt: skip
    pki.issue_dispatcher_cert(pki.create_ca(c.ca_dir), c.cert, c.key)
    lst = listen(c)
    held = [pair_raw(lst.port, request_body(f"h{i}")) for i in range(2)]
    try:
        assert all(r[2]["status"] == "pending" for r in held)
        assert one_shot(lst.port, frame(dumps(request_body("h3")))) == {
            "status": "error", "reason": "pairing queue full"}  # fmt: skip
        assert events.has("pair-reject", reason="queue-full")
    finally:
        for s, fh, _ in held:
            fh.close()
            s.close()


def test_approval_timeout(
    cfg: DispatcherConfig, listen: Callable[..., Listener], events: Events
) -> None:
    lst = listen(cfg, approval_timeout=0.6)
    s, fh, first = pair_raw(lst.port, request_body())
    with s, fh:
        t0 = time.monotonic()
        code, _, raw = read_response(fh)
        assert code == 200 and 0.2 < time.monotonic() - t0 < 5
        assert json.loads(raw) == {"status": "denied", "reason": "approval timeout"}
    assert pq.get_request(cfg.pairing_dir, first["reqid"]) is None
    wait_until(lambda: events.has("pair-timeout", reqid=first["reqid"]), 5, "pair-timeout log")


def test_agent_disconnect_withdraws_and_stop_answers(
    cfg: DispatcherConfig, listen: Callable[..., Listener]
) -> None:
    lst = listen(cfg)
    body = request_body("gone.test")
    s, fh, first = pair_raw(lst.port, body)
    fh.close()
    s.close()
    wait_until(lambda: pq.get_request(cfg.pairing_dir, first["reqid"]) is None, 5, "withdrawal")
    # the agent was still asking: its very request, sent again, is queued again (our
    # agent reconnects with the same CSR and nonce); another nonce for that key is not
    s, fh, back = pair_raw(lst.port, body)
    assert back["status"] == "pending" and back["reqid"] != first["reqid"], back
    fh.close()
    s.close()
    wait_until(lambda: pq.get_request(cfg.pairing_dir, back["reqid"]) is None, 5, "withdrawal")
    assert one_shot(lst.port, frame(dumps({**body, "nonce": "cd" * 16}))) == {
        "status": "error", "reason": "duplicate request: this key was submitted before - run "
        "request-pairing again for a new key"}  # fmt: skip
    s, fh, first = pair_raw(lst.port, request_body("waiting.test"))
    with s, fh:
        stopping = asyncio.run_coroutine_threadsafe(lst.server.stop(), lst.loop)
        _, _, raw = read_response(fh)
        assert json.loads(raw) == {"status": "denied", "reason": "pairing mode stopped"}
    stopping.result(10)
    assert pq.count(cfg.pairing_dir) == 0
    with pytest.raises(OSError):
        connect(lst.port, timeout=2)


def test_silent_clients_do_not_block_others(
    cfg: DispatcherConfig, listen: Callable[..., Listener]
) -> None:
    lst = listen(cfg, handshake_timeout=5, read_timeout=5)
    silent_tcp = socket.create_connection(("127.0.0.1", lst.port))
    silent_tls = connect(lst.port)  # handshake done, never sends a request
    waiting = [pair_raw(lst.port, request_body(f"w{i}")) for i in range(3)]
    try:
        t0 = time.monotonic()
        assert one_shot(lst.port, b"POST / HTTP/1.0\r\nContent-Length: 1\r\n\r\nx")["reason"] == (
            "invalid request")  # fmt: skip
        assert time.monotonic() - t0 < 2
        assert len(pq.list_pending(cfg.pairing_dir)) == 3
        assert lst.server.live >= 5
    finally:
        silent_tcp.close()
        silent_tls.close()
        for s, fh, _ in waiting:
            fh.close()
            s.close()


def test_rate_limit(tmp_path: Path, listen: Callable[..., Listener], events: Events) -> None:
    c = DispatcherConfig(ca_dir=str(tmp_path / "etc"), state_dir=str(tmp_path / "state"),
                         pairing_rate_limit_volume="2/60/300").finish()  # fmt: skip
    pki.issue_dispatcher_cert(pki.create_ca(c.ca_dir), c.cert, c.key)
    lst = listen(c)
    bad = b"POST / HTTP/1.0\r\nContent-Length: 1\r\n\r\nx"
    for _ in range(2):
        assert one_shot(lst.port, bad)["reason"] == "invalid request"
    with pytest.raises((ssl.SSLError, OSError)):
        one_shot(lst.port, bad)
    assert events.has("rate-block", ip="127.0.0.1", reason="volume")
