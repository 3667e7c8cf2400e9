"""The one fan-out engine (dispatcher.client.aio.drive), as ``ced`` runs it.

``ced`` (:data:`dispatcher.client.blocking.BLOCKING`) runs a fan-out of more than one host
on an asyncio loop of its own. Against real TLS listeners on loopback (an asyncio server
on a thread of its own): the requests overlap (wall time of one, not of all), start no
thread, stay within the limit and within the cap of connections being opened; addresses
are tried in turn; a job's exception is its result; thousands of jobs that finish at once
need no recursion; a fan-out inside a job runs on the same loop; cancelling a fan-out
cancels its jobs; a caller already on an event loop gets its fan-out too; the descriptor
budget follows the soft limit.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import pytest

from agent.common.tlsconf import client_context, server_context
from dispatcher.client import aio, blocking, fanout
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
    print(f"[fan-out] {n} requests of {DELAY} s each in {wall:.2f} s, peak {agents.peak}")
    assert [r["status"] for r in out] == ["ok"] * n
    assert [r["host"] for r in out] == [f"h{i}" for i in range(n)]
    assert wall < n * DELAY / 4  # one after another: n * DELAY = 24 s (loose: a busy machine)
    assert agents.peak > n // 2
    assert max(seen) == threads_before  # no thread was started for them
    assert "asyncio" in sys.modules


def test_at_most_limit_in_flight(agents: Listener, cctx: ssl.SSLContext) -> None:
    reach = fanout.Reach(cctx, 10, 5, io=BLOCKING)
    out = run_blocking(fanout.ping_all(_targets(15, agents.port), "r2", reach))
    assert all(r["status"] == "ok" for r in out)
    assert agents.peak == 5


class Counting(asyncio.Semaphore):
    """Opening slots that count how many are taken at once."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.taken = 0
        self.peak = 0

    async def acquire(self) -> Literal[True]:
        await super().acquire()
        self.taken += 1
        self.peak = max(self.peak, self.taken)
        return True

    def release(self) -> None:
        self.taken -= 1
        super().release()


def test_opening_cap_bounds_connections_in_handshake(agents: Listener,
                                                     cctx: ssl.SSLContext) -> None:  # fmt: skip
    reqs = [AgentRequest("127.0.0.1", agents.port, "POST", "/ping", {}, cctx, 10, f"h{i}")
            for i in range(12)]  # fmt: skip
    slots = Counting(3)

    async def main() -> list[AgentReply | BaseException]:
        aio._opening[asyncio.get_running_loop()] = slots
        return await aio.drive([lambda r=r: aio.call(r) for r in reqs], 12)  # type: ignore[misc]

    out = asyncio.run(main())
    assert all(isinstance(r, AgentReply) and r.code == 200 for r in out)
    assert slots.peak == 3 and slots.taken == 0  # every slot given back
    assert agents.peak > 3  # the others kept waiting for their answers meanwhile


def test_connect_tries_every_address(monkeypatch: pytest.MonkeyPatch, agents: Listener,
                                     cctx: ssl.SSLContext) -> None:  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    closed = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
              ("127.0.0.1", closed_port))  # fmt: skip
    good = (*closed[:4], ("127.0.0.1", agents.port))
    req = AgentRequest("agent.test", agents.port, "POST", "/ping", {}, cctx, 10, "a")

    def one() -> AgentReply:
        out = run_blocking(BLOCKING.gather([lambda: BLOCKING.call(req)] * 2, 2))[0]
        assert isinstance(out, AgentReply)
        return out

    async def infos(*a: Any, **kw: Any) -> list[Any]:
        return list(answer)

    answer = [closed, good]
    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", infos)
    assert one().code == 200
    answer = [closed, closed]
    r = one()  # the same error twice: that error, as upstream words it
    assert r.code is None and "connection refused" in r.error

    real = asyncio.selector_events.BaseSelectorEventLoop.sock_connect

    async def unreachable(self: Any, sock: socket.socket, addr: Any) -> None:
        if addr[1] != closed_port:
            raise OSError(errno.EHOSTUNREACH, "No route to host")
        await real(self, sock, addr)

    answer = [closed, good]
    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "sock_connect", unreachable)
    r = one()  # two different errors: "Multiple exceptions", which upstream's table words so
    assert r.code is None and r.error == NO_DATA


def test_job_exceptions_and_order() -> None:
    async def job(i: int) -> int:
        await BLOCKING.sleep(0.01 * (5 - i))
        if i == 2:
            raise RuntimeError("boom")
        return i

    out = run_blocking(BLOCKING.gather([lambda i=i: job(i) for i in range(5)], 5))  # type: ignore[misc]
    assert out[:2] == [0, 1] and out[3:] == [3, 4]
    assert isinstance(out[2], RuntimeError)


def test_thousands_of_jobs_that_finish_at_once() -> None:
    async def job(i: int) -> int:
        return i

    n = 20_000  # more than the recursion limit: each start must not nest in the last
    out = asyncio.run(aio.drive([lambda i=i: job(i) for i in range(n)], 64))  # type: ignore[misc]
    assert out == list(range(n))


def test_nested_fan_out_runs_to_its_end() -> None:
    async def inner(i: int) -> int:
        await BLOCKING.sleep(0.001)
        return i

    async def outer(i: int) -> list[int | BaseException]:
        await BLOCKING.sleep(0.001)
        return await BLOCKING.gather([lambda j=j: inner(10 * i + j) for j in range(3)], 3)  # type: ignore[misc]

    out = run_blocking(BLOCKING.gather([lambda i=i: outer(i) for i in range(3)], 3))  # type: ignore[misc]
    assert out == [[0, 1, 2], [10, 11, 12], [20, 21, 22]]


def test_cancelling_a_fan_out_cancels_its_jobs() -> None:
    started: list[int] = []
    cancelled: list[int] = []

    async def job(i: int) -> int:
        started.append(i)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return i

    async def main() -> None:
        run = asyncio.ensure_future(aio.drive([lambda i=i: job(i) for i in range(10)], 4))  # type: ignore[misc]
        await asyncio.sleep(0.05)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await asyncio.sleep(0.05)

    t0 = time.monotonic()
    asyncio.run(main())
    assert sorted(started) == [0, 1, 2, 3]  # no job started after the cancel
    assert sorted(cancelled) == [0, 1, 2, 3]
    assert time.monotonic() - t0 < 10


def test_a_caller_on_an_event_loop_gets_its_fan_out() -> None:
    async def job(i: int) -> int:
        await BLOCKING.sleep(0.01)
        return i

    async def caller() -> list[int | BaseException]:  # blocks its own loop, as a sync caller would
        return run_blocking(BLOCKING.gather([lambda i=i: job(i) for i in range(4)], 4))  # type: ignore[misc]

    assert asyncio.run(caller()) == [0, 1, 2, 3]


def test_fd_budget_follows_the_soft_limit() -> None:
    code = (
        "import resource\n"
        "from dispatcher.client.aio import fd_budget, FD_RESERVE\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (200, 300))\n"
        "print(fd_budget(100), fd_budget(1000), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=60, check=True)  # fmt: skip
    small, capped, soft = map(int, p.stdout.split())
    assert small == 100  # 164 descriptors were enough: the limit is left alone
    assert soft == 300  # raised to the hard limit, no further
    assert capped == 300 - aio.FD_RESERVE


def test_collector_tuned_during_a_fan_out_and_restored() -> None:
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    seen: list[tuple[int, bool]] = []

    async def job() -> int:
        seen.append((gc.get_threshold()[0], gc.get_freeze_count() > frozen))
        return 1

    assert run_blocking(BLOCKING.gather([job, job], 2)) == [1, 1]
    assert seen == [(blocking.GC_YOUNG, True)] * 2
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen


def test_deadline_starts_when_the_request_gets_its_opening_slot(pki: TestCA,
                                                                cctx: ssl.SSLContext) -> None:  # fmt: skip
    a = pki.issue("agent3", cn="agent.test")
    lab = TlsAgents()
    try:
        honest = lab.add(server_context(str(a.cert), str(a.key), str(pki.cert_path)))
        silent = lab.add(None, "silent")  # holds the only slot until its own deadline
        stalled = AgentRequest("127.0.0.1", silent.port, "POST", "/ping", {}, cctx, 1.5, "s")
        quick = AgentRequest("127.0.0.1", honest.port, "POST", "/ping", {}, cctx, 1.0, "h")

        async def main() -> list[AgentReply | BaseException]:
            jobs = [lambda: aio.call(stalled), lambda: aio.call(quick)]
            return await aio.drive(jobs, 2, opening=1)

        out = asyncio.run(main())
    finally:
        lab.stop()
    first, second = out
    assert isinstance(first, AgentReply) and "timed out" in first.error
    # waited 1.5 s for the slot, longer than its own 1 s deadline, and still answered
    assert isinstance(second, AgentReply) and second.code == 200, second
