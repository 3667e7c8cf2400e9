"""dispatcher.client.fanout against real agent processes on distinct loopback addresses."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.common.tlsconf import client_context
from dispatcher.client import fanout
from dispatcher.client.aio import SessionCache
from dispatcher.registry import Target
from dispatcher.reqid import new_reqid
from ops.lab.agentproc import AgentProc, make_agent
from ops.lab.net import free_port, wait_listening
from ops.lab.pki import Issued, TestCA

pytestmark = pytest.mark.integration

HEALTHY = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
STOPPED = "127.0.0.5"
BLACKHOLE = "127.0.0.6"
RUN_KEYS = {"host", "script", "exit", "stdout", "stderr", "reqid", "rtt"}
FAIL_KEYS = {"host", "script", "exit", "error", "rtt", "reqid"}


@dataclass
class Fleet:
    agents: list[AgentProc]
    healthy: list[Target]
    stopped: Target
    blackhole: Target
    ctx: ssl.SSLContext


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, pki: TestCA, dispatcher_cert: Issued,
    script_dir: Path,
) -> Iterator[Fleet]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("fanout")
    scripts = {n: str(script_dir / f"{n}.sh") for n in ("echo-args", "exit3", "sleep1")}
    agents = [
        make_agent(tmp / f"agent{i}", pki, {"disp": dispatcher_cert}, scripts, host=addr)
        for i, addr in enumerate(HEALTHY)
    ]
    hole = socket.socket()
    hole.bind((BLACKHOLE, 0))
    hole.listen(16)  # the kernel completes TCP handshakes; nobody ever reads or writes
    try:
        for a in agents:
            a.start(wait=False)
        for a in agents:
            wait_listening(a.host, a.port, a.proc)
        yield Fleet(
            agents,
            [Target(f"web{i}", a.host, a.port) for i, a in enumerate(agents)],
            Target("gone", STOPPED, free_port(STOPPED)),
            Target("hole", BLACKHOLE, int(hole.getsockname()[1])),
            client_context(str(pki.cert_path), str(dispatcher_cert.cert),
                           str(dispatcher_cert.key)),
        )  # fmt: skip
    finally:
        hole.close()
        for a in agents:
            a.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_parallel_run_with_dead_and_silent_agents(fleet: Fleet) -> None:
    reqid = new_reqid()
    targets = [*fleet.healthy, fleet.stopped, fleet.blackhole]
    timeout = 4.0
    t0 = time.monotonic()
    res = run(fanout.run_all(targets, "sleep1", [], reqid, "", "", fleet.ctx, timeout, 64))
    wall = time.monotonic() - t0
    # Everything ran at once: three 1 s scripts and one 4 s timeout end soon after 4 s.
    assert timeout <= wall < timeout + 1.5, wall
    assert [r["host"] for r in res] == ["web0", "web1", "web2", "gone", "hole"]
    for r in res[:3]:
        assert set(r) == RUN_KEYS, r
        assert (r["exit"], r["stdout"], r["script"], r["reqid"]) == (0, "slept\n", "sleep1", reqid)
        # The silent agent did not hold the healthy ones up.
        assert 1000 <= int(r["rtt"].removesuffix("ms")) < 3000, r
    gone, hole = res[3], res[4]
    assert set(gone) == FAIL_KEYS and set(hole) == FAIL_KEYS
    assert gone["exit"] == -1 and hole["exit"] == -1
    assert gone["error"] == (
        f"host '{STOPPED}' did not respond on port {fleet.stopped.port} - connection refused "
        "(agent not running, or wrong port?)"
    )
    assert hole["error"] == f"host '{BLACKHOLE}' did not respond - connection timed out"
    assert int(hole["rtt"].removesuffix("ms")) >= timeout * 1000 - 50


def test_run_carries_args_and_credentials(fleet: Fleet) -> None:
    reqid = new_reqid()
    res = run(fanout.run_all(fleet.healthy[:2], "echo-args", ["hello", "two words"], reqid,
                             "alice", "s3cret", fleet.ctx, 10, 2))  # fmt: skip
    for r in res:
        assert set(r) == RUN_KEYS
        lines = r["stdout"].splitlines()
        assert lines[:3] == ["argc=2", "arg1=[hello]", "arg2=[two words]"]
        ctx = json.loads(lines[3].removeprefix("stdin="))
        assert (ctx["username"], ctx["token"], ctx["reqid"]) == ("alice", "s3cret", reqid)
        assert ctx["args"] == ["hello", "two words"] and ctx["dispatcher"] == "disp"
        assert r["stderr"] == "to-stderr\n"


def test_script_exit_code_and_unknown_script(fleet: Fleet) -> None:
    t = fleet.healthy[:1]
    r = run(fanout.run_all(t, "exit3", [], "r-exit3", "", "", fleet.ctx, 10, 1))[0]
    assert (r["exit"], r["stdout"], r["stderr"]) == (3, "about to exit 3\n", "exit3 stderr line\n")
    r = run(fanout.run_all(t, "not-allowed", [], "r-deny", "", "", fleet.ctx, 10, 1))[0]
    assert r == {"host": "web0", "script": "not-allowed", "exit": -1, "reqid": "r-deny",
                 "error": "script not permitted", "rtt": r["rtt"]}  # fmt: skip


def test_untrusted_dispatcher_is_forbidden(fleet: Fleet, pki: TestCA) -> None:
    stranger = pki.issue("stranger", cn="ctrl-exec-dispatcher")  # CA-signed, not in the map
    ctx = client_context(str(pki.cert_path), str(stranger.cert), str(stranger.key))
    t = fleet.healthy[:1]
    r = run(fanout.run_all(t, "echo-args", [], "r-x", "", "", ctx, 10, 1))[0]
    assert r == {"host": "web0", "script": "echo-args", "exit": -1, "reqid": "r-x",
                 "error": "forbidden: serial mismatch", "rtt": r["rtt"]}  # fmt: skip
    p = run(fanout.ping_all(t, "r-y", ctx, 10, 1))[0]
    assert p == {"host": "web0", "status": "error", "error": "forbidden: serial mismatch",
                 "rtt": p["rtt"]}  # fmt: skip


def test_foreign_ca_certificate_fails_the_handshake(fleet: Fleet, pki: TestCA,
                                                    tmp_path: Path) -> None:  # fmt: skip
    other = TestCA(tmp_path / "other")
    bad = other.issue("disp")
    ctx = client_context(str(pki.cert_path), str(bad.cert), str(bad.key))
    p = run(fanout.ping_all(fleet.healthy[:1], "r", ctx, 10, 1))[0]
    assert p["error"] == (
        f"TLS handshake with '{HEALTHY[0]}' failed - certificate or trust mismatch"
    )


def test_ping_and_reported_hostname(fleet: Fleet) -> None:
    targets = [*fleet.healthy[:2], Target("agent.test", HEALTHY[2], fleet.healthy[2].port),
               fleet.stopped]  # fmt: skip
    res = run(fanout.ping_all(targets, "r-ping", fleet.ctx, 5, 8))
    for r in res[:2]:
        assert r["status"] == "ok" and r["reqid"] == "r-ping"
        assert r["reported_hostname"] == "agent.test"
        assert set(r) == {"host", "status", "version", "expiry", "staged", "reqid", "rtt",
                          "reported_hostname"}  # fmt: skip
    assert [r["host"] for r in res] == ["web0", "web1", "agent.test", "gone"]
    assert "reported_hostname" not in res[2]
    assert set(res[3]) == {"host", "status", "error", "rtt"} and res[3]["status"] == "error"


def test_async_accept_busy_and_result(fleet: Fleet) -> None:
    t = fleet.healthy[1:2]
    first, second = new_reqid(), new_reqid()
    a = run(fanout.run_all(t, "sleep1", [], first, "", "", fleet.ctx, 10, 1, async_=True))[0]
    assert a == {"host": "web1", "script": "sleep1", "status": "accepted", "reqid": first,
                 "rtt": a["rtt"]}  # fmt: skip
    b = run(fanout.run_all(t, "sleep1", [], second, "", "", fleet.ctx, 10, 1, async_=True))[0]
    assert b == {"host": "web1", "script": "sleep1", "status": "busy", "reqid": second,
                 "error": "script already running", "rtt": b["rtt"]}  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        r = run(fanout.result_all(t, first, fleet.ctx, 5, 1))[0]
        assert r["host"] == "web1" and r["reqid"] == first
        if r.get("status") != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r["status"] == "done", r
    assert (r["exit"], r["stdout"]) == (0, "slept\n")
    u = run(fanout.result_all(t, second, fleet.ctx, 5, 1))[0]
    assert u == {"host": "web1", "status": "unknown", "reqid": second, "rtt": u["rtt"]}
    gone = run(fanout.result_all([fleet.stopped], first, fleet.ctx, 5, 1))[0]
    assert gone["status"] == "error" and "connection refused" in gone["error"]
    assert set(gone) == {"host", "status", "error", "reqid", "rtt"}


def test_async_to_dead_agent(fleet: Fleet) -> None:
    r = run(fanout.run_all([fleet.stopped], "sleep1", [], "r-a", "", "", fleet.ctx, 5, 1,
                           async_=True))[0]  # fmt: skip
    assert set(r) == {"host", "script", "status", "error", "rtt", "reqid"}
    assert r["status"] == "error" and "exit" not in r


def test_sessions_are_resumed_by_real_agents(fleet: Fleet) -> None:
    cache = SessionCache()
    for _ in range(3):
        res = run(fanout.ping_all(fleet.healthy, "r", fleet.ctx, 5, 8, sessions=cache))
        assert all(r["status"] == "ok" for r in res)
    assert len(cache) == 3
    assert cache.resumed == 6
