"""One mTLS request to one agent over a blocking socket; threads for a fan-out.

The same request as :mod:`dispatcher.client.aio` (the protocol, TLS and error strings
are :mod:`dispatcher.client.wire`'s), without asyncio: ``ced`` starts tens of milliseconds
faster. :data:`BLOCKING` is the :class:`~dispatcher.client.io.AgentIO` the CLI runs its
dispatch verbs on, through :func:`dispatcher.client.io.run_blocking`: this client for one
request, and for a fan-out :mod:`dispatcher.client.multiplex` (every request in flight on
one thread); :class:`BlockingIO` alone runs a fan-out on a thread per request.

Connecting follows ``asyncio.open_connection``: every address ``getaddrinfo`` gives is
tried in turn, with ``TCP_NODELAY``; when all fail the error is the only one, the first
if all read the same, else ``Multiple exceptions: ...``, so a loopback or single-address
agent gets asyncio's message. The deadline bounds connect, handshake, request and
response; name resolution itself cannot be interrupted.
"""

from __future__ import annotations

import contextvars
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from dispatcher.client.io import run_blocking
from dispatcher.client.wire import (
    READ_CHUNK,
    TRANSPORT_ERRORS,
    AgentReply,
    AgentRequest,
    Attempt,
)

if TYPE_CHECKING:
    from agent.common.authhook import Decision
    from dispatcher.client.multiplex import MultiplexIO

R = TypeVar("R")
T = TypeVar("T")
P = ParamSpec("P")


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _addrinfo(address: str, port: int) -> list[tuple[Any, ...]]:
    """``getaddrinfo``, answered directly for an IP literal (as asyncio does)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address)
        except OSError:
            continue
        sockaddr = (address, port) if family == socket.AF_INET else (address, port, 0, 0)
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]
    return socket.getaddrinfo(address, port, 0, socket.SOCK_STREAM)


def connect(address: str, port: int, deadline: float) -> socket.socket:
    """A connected TCP socket, as ``asyncio.open_connection`` would make it."""
    infos = _addrinfo(address, port)
    errors: list[OSError] = []
    for family, type_, proto, _, sockaddr in infos:
        sock: socket.socket | None = None
        try:
            sock = socket.socket(family, type_, proto)
            sock.settimeout(_left(deadline))
            sock.connect(sockaddr)
        except OSError as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, TimeoutError) and exc.errno is None:
                raise  # the deadline (the kernel's ETIMEDOUT has an errno)
            errors.append(exc)
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    if not errors:
        raise OSError("getaddrinfo() returned empty list")
    if len(errors) == 1 or all(str(e) == str(errors[0]) for e in errors):
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")


def _drive(a: Attempt) -> bytes:
    """Connect, then move the bytes :meth:`~dispatcher.client.wire.Attempt.exchange` asks for."""
    deadline = a.t0 + a.req.timeout
    with connect(a.req.address, a.req.port, deadline) as sock:
        try:
            steps = a.exchange()
            want = next(steps)
            while True:
                sock.settimeout(_left(deadline))
                if want is None:
                    data = sock.recv(READ_CHUNK)
                else:
                    sock.sendall(want)
                    data = b""
                want = steps.send(data)
        except StopIteration as done:
            raw: bytes = done.value
            return raw


def call(req: AgentRequest) -> AgentReply:
    """One request to one agent; never raises for transport or HTTP failures.

    As :func:`dispatcher.client.aio.call`, blocking the calling thread.
    """
    a = Attempt(req)
    try:
        raw = _drive(a)
    except TRANSPORT_ERRORS as exc:
        return a.failed(exc)
    return a.done(raw)


def gather(jobs: Sequence[Callable[[], Awaitable[R]]], limit: int) -> list[R | BaseException]:
    """Run every job (a coroutine that never suspends) on up to ``limit`` threads.

    As with asyncio tasks, each job runs in a copy of the caller's context (the log
    context of :mod:`agent.common.logfmt` included). A single job runs on the calling thread.
    Worker threads are daemons, so an interrupted ``ced`` exits without waiting for
    them (the main thread only joins).
    """
    contexts = [contextvars.copy_context() for _ in jobs]

    def run(i: int) -> R:
        return contexts[i].run(run_blocking, _await(jobs[i]))

    if len(jobs) == 1 or limit <= 1:
        out: list[R | BaseException] = []
        for i in range(len(jobs)):
            try:
                out.append(run(i))
            except Exception as exc:
                out.append(exc)
        return out
    results: dict[int, R | BaseException] = {}
    todo = iter(range(len(jobs)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = run(i)
            except BaseException as exc:
                results[i] = exc

    threads = [threading.Thread(target=worker, name=f"ced-fanout-{n}", daemon=True)
               for n in range(min(limit, len(jobs)))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(jobs))]


async def _await(job: Callable[[], Awaitable[R]]) -> R:
    return await job()


def _nonsuspending(fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """``fn`` as a coroutine function whose coroutines complete without suspending."""

    async def co(*args: P.args, **kwargs: P.kwargs) -> R:
        return fn(*args, **kwargs)

    return co


class BlockingIO:
    """:class:`~dispatcher.client.io.AgentIO` whose coroutines never suspend."""

    call = staticmethod(_nonsuspending(call))
    gather = staticmethod(_nonsuspending(gather))

    async def hook(self, hook: str, ctx: dict[str, Any], timeout: float) -> Decision:
        from agent.common.authhook import call_sync

        return call_sync(hook, ctx, timeout)

    async def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def offload(self, fn: Callable[[], T], undo: Callable[[T], object] | None = None) -> T:
        return fn()  # no event loop to keep free, nothing cancels it


def __getattr__(name: str) -> MultiplexIO:
    """``BLOCKING``: the one-shot ``ced``'s :class:`AgentIO`, whose fan-outs multiplex
    their requests on one thread (:mod:`dispatcher.client.multiplex`, which builds on
    this module); :class:`BlockingIO` itself keeps a thread per request in flight."""
    if name == "BLOCKING":
        from dispatcher.client.multiplex import MULTIPLEX

        return MULTIPLEX
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _loop_running() -> bool:
    """An asyncio loop runs on this thread (never imports asyncio to find out)."""
    aio = sys.modules.get("asyncio")
    return aio is not None and aio._get_running_loop() is not None


class LoopIO(BlockingIO):
    """:class:`BlockingIO` whose fan-outs of more than one host run on an asyncio loop of
    their own (:func:`dispatcher.client.aio.drive`); one request, the auth hook and
    offloaded work stay blocking (asyncio is imported only for a fan-out)."""

    async def call(self, req: AgentRequest) -> AgentReply:
        if _loop_running():
            from dispatcher.client import aio

            return await aio.call(req)
        return call(req)

    async def gather(
        self, jobs: Sequence[Callable[[], Awaitable[R]]], limit: int
    ) -> list[R | BaseException]:
        from dispatcher.client.multiplex import fd_budget

        if _loop_running():
            from dispatcher.client import aio

            return await aio.drive(jobs, limit)
        if len(jobs) == 1 or limit <= 1:
            return gather(jobs, limit)
        import asyncio

        from dispatcher.client import aio

        return asyncio.run(aio.drive(jobs, fd_budget(limit)))

    async def sleep(self, seconds: float) -> None:
        if _loop_running():
            import asyncio

            await asyncio.sleep(seconds)
        else:
            time.sleep(seconds)
