"""Agent impersonation: a CA-signed certificate that is not the one the registry pinned
for a host gets nothing from the dispatcher (no request byte, so no operator token) and
the run reports the mismatch instead of the impostor's output.

Real agents (``ctrl-exec-agent serve``), a real impostor TLS listener on the agent's own
address and port, the real dispatcher client (blocking and asyncio). Each refusal prints
``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.certinfo import identity_der
from dispatcher.client.blocking import BLOCKING
from dispatcher.client.io import run_blocking
from dispatcher.client.pins import COUNTERS
from dispatcher.operations import Caller, do_run
from dispatcher.pki import renewal, rotation
from dispatcher.registry import resolve
from ops.lab.agentproc import AgentProc
from ops.lab.dispatcherenv import DispatcherEnv, make_env
from ops.lab.net import wait_listening
from ops.lab.pki import Issued

pytestmark = pytest.mark.integration

TOKEN = "operator-secret-token-0123456789"


def attack(name: str, detail: str) -> None:
    print(f"[attack] {name}: refused ({detail})")


@pytest.fixture(autouse=True)
def _show_attacks(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    yield
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[attack]")]
    if lines:
        with capsys.disabled():
            print("", *lines, sep="\n")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[DispatcherEnv]:
    e = make_env(tmp_path)
    try:
        yield e
    finally:
        e.stop_all()


def identity(issued: Issued) -> tuple[str, str]:
    return identity_der(ssl.PEM_cert_to_DER_cert(issued.cert.read_text()))


class Impostor(threading.Thread):
    """A TLS listener with a CA-signed cert that asks for the dispatcher's certificate (as
    an agent does) and records every application byte it receives."""

    def __init__(self, host: str, port: int, ca: Path, who: Issued) -> None:
        super().__init__(daemon=True)
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_cert_chain(str(who.cert), str(who.key))
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.2)
        self.received = b""
        self.connections = 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.stop_flag.is_set() and time.monotonic() < deadline:
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            raw.settimeout(3)
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as s:
                    for _ in range(100):
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        self.received += chunk
                    s.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"exit":0,"x":1}')
            except (OSError, ssl.SSLError):
                raw.close()

    def __enter__(self) -> Impostor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        self.join(5)
        self.sock.close()


def run_on(env: DispatcherEnv, host: str, *, blocking: bool = True) -> dict[str, object]:
    caller = Caller("api", username="alice", token=TOKEN)
    env.d.cfg.api_auth_default = "allow"
    if blocking:
        out = run_blocking(do_run(env.d, caller, [host], "true", [], io=BLOCKING))
    else:
        out = asyncio.run(do_run(env.d, caller, [host], "true", []))
    res = out["results"][0]
    assert isinstance(res, dict)
    return res


def pin(env: DispatcherEnv, name: str, agent: AgentProc) -> tuple[str, str]:
    serial, pubkey = identity(agent.agent_cert)
    env.d.registry.update(name, cert_serial=serial, pubkey_sha256=pubkey)
    return serial, pubkey


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "asyncio"])
def test_impostor_with_other_hosts_cert_receives_nothing(
    env: DispatcherEnv, blocking: bool
) -> None:
    agent = env.add_agent("web1.test")
    serial, _ = pin(env, "web1.test", agent)
    assert run_on(env, "web1.test", blocking=blocking)["exit"] == 0  # the real agent
    agent.stop()
    other = env.ca.issue("impostor", cn="db9.test")  # valid, CA-signed, another host's
    before = COUNTERS.mismatches
    t0 = time.monotonic()
    with Impostor(agent.host, agent.port, env.ca.cert_path, other) as fake:
        res = run_on(env, "web1.test", blocking=blocking)
    took = time.monotonic() - t0
    assert fake.connections >= 1, "the impostor was never reached"
    assert fake.received == b"", fake.received[:200]
    assert res["exit"] == -1 and "x" not in res
    bad = format(other.serial, "x")
    assert res["error"] == (
        f"agent certificate does not match the registry (serial {bad}, expected {serial})"
    )
    assert COUNTERS.mismatches == before + 1
    assert took < 10
    attack("impostor-agent-other-cert", f"{res['error']}; impostor got 0 bytes")


def test_unpinned_record_is_pinned_on_first_contact_then_swap_refused(
    env: DispatcherEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="ctrl-exec")
    agent = env.add_agent("old.test")  # an upstream record: no pins
    rec = env.d.registry.get("old.test")
    assert rec is not None and "cert_serial" not in rec
    assert run_on(env, "old.test")["exit"] == 0  # accepted unpinned
    out = asyncio.run(rotation.maintain(env.d))
    assert out["pinned"] == ["old.test"]
    serial, pubkey = identity(agent.agent_cert)
    rec = env.d.registry.get("old.test")
    assert rec is not None
    assert (rec["cert_serial"], rec["pubkey_sha256"]) == (serial, pubkey)
    assert any("ACTION=pinned" in m and "old.test" in m and serial in m
               for m in caplog.messages)  # fmt: skip
    assert run_on(env, "old.test")["exit"] == 0  # the pinned agent still works

    # The agent's cert swapped for another CA-signed one, even bearing the same name.
    agent.stop()
    swapped = env.ca.issue("swapped", cn="old.test")
    agent.agent_cert = swapped
    conf = dict(line.split(" = ", 1) for line in agent.config.read_text().splitlines())
    conf["cert"], conf["key"] = str(swapped.cert), str(swapped.key)
    agent.config.write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
    agent.start()
    res = run_on(env, "old.test")
    assert res["exit"] == -1
    assert f"serial {format(swapped.serial, 'x')}, expected {serial}" in str(res["error"])
    assert asyncio.run(rotation.maintain(env.d))["pinned"] == []  # no re-pin to the swap
    after = env.d.registry.get("old.test")
    assert after is not None and after["cert_serial"] == serial
    attack("swapped-agent-cert-after-pinning", str(res["error"]))


def test_renewal_accepts_old_and_new_serial_until_adopted(env: DispatcherEnv) -> None:
    agent = env.add_agent("renew.test", days=30)  # due for renewal
    old_serial, pubkey = pin(env, "renew.test", agent)
    wait_listening(agent.host, agent.port, agent.proc)
    t = resolve(env.d.registry, ["renew.test"])[0]
    out = asyncio.run(renewal.renew(env.d, t))
    assert out["status"] == "ok", out
    rec = env.d.registry.get("renew.test")
    assert rec is not None and rec["cert_serial"] == old_serial
    new_serial = rec["cert_serial_next"]
    assert new_serial and new_serial != old_serial
    assert run_on(env, "renew.test")["exit"] == 0  # old cert still served: accepted
    agent.hup()  # adopts the staged cert
    wait_listening(agent.host, agent.port, agent.proc)
    assert run_on(env, "renew.test")["exit"] == 0  # new cert: accepted too
    assert asyncio.run(rotation.maintain(env.d))["pinned"] == ["renew.test"]  # promoted
    rec = env.d.registry.get("renew.test")
    assert rec is not None
    assert (rec["cert_serial"], rec["cert_serial_next"], rec["pubkey_sha256"]) == (
        new_serial, "", pubkey)  # fmt: skip


def test_resumed_sessions_are_checked_against_the_pins(env: DispatcherEnv) -> None:
    # TLS 1.3 resumption skips the certificate exchange; the session still names the cert,
    # so a pinned agent keeps working on resumed sessions, on both clients.
    from dispatcher.client import fanout

    agent = env.add_agent("resume.test")
    serial, _ = pin(env, "resume.test", agent)
    wait_listening(agent.host, agent.port, agent.proc)
    t = resolve(env.d.registry, ["resume.test"])[0]
    ctx = env.d.client_ctx()
    resumed = 0
    for io in (None, BLOCKING):
        reach = fanout.Reach(ctx, 10, io=io)
        for _ in range(3):
            call = reach.call(t, "POST", "/ping", {"reqid": "0123456789abcdef"})
            reply = asyncio.run(call) if io is None else run_blocking(call)
            assert reply.code == 200 and reply.error == "", reply
            assert reply.peer is not None and reply.peer[0] == serial
            resumed += reply.resumed
    assert resumed >= 4
