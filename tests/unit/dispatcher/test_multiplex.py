"""dispatcher.client.multiplex: a fan-out's requests in flight together on one thread.

Against real TLS listeners on loopback (an asyncio server on a thread of its own): the
requests overlap (wall time of one, not of all), start no thread, stay within the limit
and within the cap of connections being opened; addresses are tried in turn as the
blocking client does; a job's exception is its result; thousands of jobs that finish at
once need no recursion; the descriptor budget follows the soft limit.
"""

from __future__ import annotations

import errno
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.common.tlsconf import client_context, server_context
from dispatcher.client import fanout
from dispatcher.client import multiplex as mx
from dispatcher.client.blocking import BLOCKING
from dispatcher.client.io import run_blocking
from dispatcher.client.wire import NO_DATA, AgentReply, AgentRequest
from dispatcher.registry import Target
from ops.lab.pki import TestCA
from ops.lab.proc import ROOT
from ops.lab.tlsagents import Listener, TlsAgents

DELAY = 0.4


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("mxpki"))


@pytest.fixture(scope="module")
def cctx(pki: TestCA) -> ssl.SSLContext:
    d = pki.issue("dispatcher", cn="ctrl-exec-dispatcher")
    return client_context(str(pki.cert_path), str(d.cert), str(d.key))


@pytest.fixture()
def agents(pki: TestCA) -> Iterator[Listener]:
    a = pki.issue("agent", cn="agent.test")
    lab = TlsAgents()
    try:
        yield lab.add(server_context(str(a.cert), str(a.key), str(pki.cert_path)), delay=DELAY)
    finally:
        lab.stop()


def _targets(n: int, port: int) -> list[Target]:
    return [Target(f"h{i}", "127.0.0.1", port) for i in range(n)]


def test_requests_overlap_on_one_thread(agents: Listener, cctx: ssl.SSLContext) -> None:
    n = 60
    reach = fanout.Reach(cctx, 10, n, io=BLOCKING)
    threads_before = threading.active_count()
    seen: list[int] = []

    def told(res: dict[str, Any], outcome: str) -> None:
        seen.append(threading.active_count())

    t0 = time.monotonic()
    out = run_blocking(fanout.ping_all(_targets(n, agents.port), "r1", reach, on_result=told))
    wall = time.monotonic() - t0
    print(f"[multiplex] {n} requests of {DELAY} s each in {wall:.2f} s, peak {agents.peak}")
    assert [r["status"] for r in out] == ["ok"] * n
    assert [r["host"] for r in out] == [f"h{i}" for i in range(n)]
    assert wall < n * DELAY / 4  # one after another: n * DELAY = 24 s (loose: a busy machine)
    assert agents.peak > n // 2
    assert max(seen) == threads_before  # no thread was started for them


def test_at_most_limit_in_flight(agents: Listener, cctx: ssl.SSLContext) -> None:
    reach = fanout.Reach(cctx, 10, 5, io=BLOCKING)
    out = run_blocking(fanout.ping_all(_targets(15, agents.port), "r2", reach))
    assert all(r["status"] == "ok" for r in out)
    assert agents.peak == 5


def test_opening_cap_bounds_connections_in_handshake(agents: Listener,
                                                     cctx: ssl.SSLContext) -> None:  # fmt: skip
    opened: list[int] = []

    class Watched(mx._Loop):
        def _open(self, job: Any, req: AgentRequest) -> None:
            super()._open(job, req)
            opened.append(self.opening)

    reqs = [AgentRequest("127.0.0.1", agents.port, "POST", "/ping", {}, cctx, 10, f"h{i}")
            for i in range(12)]  # fmt: skip
    loop = Watched([lambda r=r: mx.MULTIPLEX.call(r) for r in reqs], 12, opening=3)  # type: ignore[misc]
    out = loop.run()
    assert all(isinstance(r, AgentReply) and r.code == 200 for r in out)
    assert max(opened) == 3
    assert agents.peak > 3  # the others kept waiting for their answers meanwhile


def test_connect_tries_every_address(monkeypatch: pytest.MonkeyPatch, agents: Listener,
                                     cctx: ssl.SSLContext) -> None:  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    closed = (
        socket.AF_INET,
        socket.SOCK_STREAM,
        socket.IPPROTO_TCP,
        "",
        ("127.0.0.1", closed_port),
    )
    good = (*closed[:4], ("127.0.0.1", agents.port))
    req = AgentRequest("agent.test", agents.port, "POST", "/ping", {}, cctx, 10, "a")

    def one() -> AgentReply:
        out = mx.drive([lambda: mx.MULTIPLEX.call(req)], 1)[0]
        assert isinstance(out, AgentReply)
        return out

    monkeypatch.setattr(mx.blocking, "_addrinfo", lambda a, p: [closed, good])
    assert one().code == 200
    monkeypatch.setattr(mx.blocking, "_addrinfo", lambda a, p: [closed, closed])
    r = one()  # the same error twice: that error, as upstream words it
    assert r.code is None and "connection refused" in r.error

    def refused(sock: socket.socket, addr: Any) -> int:
        return errno.ECONNREFUSED if addr[1] == closed_port else errno.EHOSTUNREACH

    monkeypatch.setattr(mx.socket.socket, "connect_ex", refused)
    monkeypatch.setattr(mx.blocking, "_addrinfo", lambda a, p: [closed, good])
    r = one()  # two different errors: "Multiple exceptions", which upstream's table words so
    assert r.code is None and r.error == NO_DATA


def test_loops_share_the_jobs_and_the_limit(pki: TestCA, cctx: ssl.SSLContext) -> None:
    a = pki.issue("agent2", cn="agent.test")
    lab = TlsAgents()
    try:
        lst = lab.add(server_context(str(a.cert), str(a.key), str(pki.cert_path)), delay=0.2)
        reqs = [AgentRequest("127.0.0.1", lst.port, "POST", f"/ping/{i}", {}, cctx, 10, f"h{i}")
                for i in range(40)]  # fmt: skip
        threads: set[str] = set()

        async def job(r: AgentRequest) -> AgentReply:
            threads.add(threading.current_thread().name)
            return await mx.MULTIPLEX.call(r)

        out = mx.drive([lambda r=r: job(r) for r in reqs], 8, loops=2)  # type: ignore[misc]
    finally:
        lab.stop()
    assert [r.body["path"] for r in out if isinstance(r, AgentReply) and r.body] == [
        f"/ping/{i}" for i in range(40)
    ]
    assert lst.peak <= 8  # 4 per loop
    assert len(threads) == 2
    assert mx.loops_for(60, 1000) == 1  # a small fan-out stays on the calling thread
    assert mx.loops_for(10_000, 1) == 1


def test_job_exceptions_and_order() -> None:
    async def job(i: int) -> int:
        await mx.MULTIPLEX.sleep(0.01 * (5 - i))
        if i == 2:
            raise RuntimeError("boom")
        return i

    out = mx.drive([lambda i=i: job(i) for i in range(5)], 5)  # type: ignore[misc]
    assert out[:2] == [0, 1] and out[3:] == [3, 4]
    assert isinstance(out[2], RuntimeError)


def test_thousands_of_jobs_that_finish_at_once() -> None:
    async def job(i: int) -> int:
        return i

    n = 20_000  # more than the recursion limit: each start must not nest in the last
    out = mx.drive([lambda i=i: job(i) for i in range(n)], 64)  # type: ignore[misc]
    assert out == list(range(n))


def test_nested_fan_out_runs_to_its_end() -> None:
    async def inner(i: int) -> int:
        await mx.MULTIPLEX.sleep(0.001)
        return i

    async def outer(i: int) -> list[int | BaseException]:
        await mx.MULTIPLEX.sleep(0.001)
        return await mx.MULTIPLEX.gather([lambda j=j: inner(10 * i + j) for j in range(3)], 3)  # type: ignore[misc]

    out = run_blocking(mx.MULTIPLEX.gather([lambda i=i: outer(i) for i in range(3)], 3))  # type: ignore[misc]
    assert out == [[0, 1, 2], [10, 11, 12], [20, 21, 22]]


def test_fd_budget_follows_the_soft_limit() -> None:
    code = (
        "import resource\n"
        "from dispatcher.client.multiplex import fd_budget, FD_RESERVE\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (200, 300))\n"
        "print(fd_budget(100), fd_budget(1000), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=60, check=True)  # fmt: skip
    small, capped, soft = map(int, p.stdout.split())
    assert small == 100  # 164 descriptors were enough: the limit is left alone
    assert soft == 300  # raised to the hard limit, no further
    assert capped == 300 - mx.FD_RESERVE
