"""One mTLS request to one agent over a blocking socket; ``ced``'s fan-outs on asyncio.

The same request as :mod:`dispatcher.client.aio` (the protocol, TLS and error strings
are :mod:`dispatcher.client.wire`'s), without asyncio: ``ced run`` to one host starts
tens of milliseconds faster (``import asyncio`` alone is about 50 ms here).
:data:`BLOCKING` is the :class:`~dispatcher.client.io.AgentIO` the CLI runs its dispatch
verbs on, through :func:`dispatcher.client.io.run_blocking`: this client for one request,
and for a fan-out the asyncio engine of the API daemon (:func:`dispatcher.client.aio.drive`)
on an event loop of its own, so every host count above one takes one code path.

Connecting follows ``asyncio.open_connection``: every address ``getaddrinfo`` gives is
tried in turn, with ``TCP_NODELAY``; when all fail the error is the only one, the first
if all read the same, else ``Multiple exceptions: ...``, so a loopback or single-address
agent gets asyncio's message. The deadline bounds connect, handshake, request and
response; name resolution itself cannot be interrupted.
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

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

R = TypeVar("R")
T = TypeVar("T")


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


def one_by_one(jobs: Sequence[Callable[[], Awaitable[R]]]) -> list[R | BaseException]:
    """Every job (a coroutine that never suspends) in turn on the calling thread, each in a
    copy of the caller's context (as asyncio tasks are); results or exceptions in order."""
    out: list[R | BaseException] = []
    for job in jobs:
        try:
            out.append(contextvars.copy_context().run(run_blocking, _await(job)))
        except Exception as exc:
            out.append(exc)
    return out


#: set inside the jobs of a fan-out :class:`BlockingIO` runs on its event loop
_ON_LOOP: contextvars.ContextVar[bool] = contextvars.ContextVar("ced_fanout_loop", default=False)


#: the cyclic collector's first threshold while a fan-out runs (Python's default: 700)
GC_YOUNG = 20_000


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """The collector leaves what existed before the fan-out alone (``gc.freeze``: the
    registry's records, the modules) and runs less often during it: thousands of hosts in
    flight allocate fast, and a full collection walks every live object. Restored after."""
    import gc

    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def on_a_loop(jobs: Sequence[Callable[[], Awaitable[R]]], limit: int) -> list[R | BaseException]:
    """Every job on an asyncio event loop of its own (:func:`dispatcher.client.aio.drive`:
    at most ``limit`` at once), run to its end before this returns; on a thread of its own
    when the calling thread already runs a loop (a caller blocking it)."""
    import asyncio

    from dispatcher.client import aio

    async def main() -> list[R | BaseException]:
        _ON_LOOP.set(True)
        return await aio.drive(jobs, limit)

    if asyncio._get_running_loop() is None:
        with _fewer_collections():
            return asyncio.run(main())
    done: list[list[R | BaseException]] = []
    failed: list[BaseException] = []
    ctx = contextvars.copy_context()

    def run() -> None:
        try:
            done.append(ctx.run(asyncio.run, main()))
        except BaseException as exc:  # raised on the calling thread below
            failed.append(exc)

    t = threading.Thread(target=run, name="ced-fanout", daemon=True)
    t.start()
    t.join()
    if failed:
        raise failed[0]
    return done[0]


async def _await(job: Callable[[], Awaitable[R]]) -> R:
    return await job()


class BlockingIO:
    """The one-shot ``ced``'s :class:`~dispatcher.client.io.AgentIO`: outside a fan-out its
    coroutines never suspend (one request is :func:`call`, on a blocking socket; the auth
    hook is ``subprocess``; offloaded work runs in place), so
    :func:`~dispatcher.client.io.run_blocking` runs an operation without an event loop.

    A fan-out of more than one host (``limit`` above 1) runs on an event loop
    (:func:`on_a_loop`), where the same coroutines then await
    :func:`dispatcher.client.aio.call` and ``asyncio.sleep``; the hook and offloaded
    work still complete at once, holding the loop. asyncio is imported only then.
    """

    async def call(self, req: AgentRequest) -> AgentReply:
        if _ON_LOOP.get():
            from dispatcher.client import aio

            return await aio.call(req)
        return call(req)

    async def gather(
        self, jobs: Sequence[Callable[[], Awaitable[R]]], limit: int
    ) -> list[R | BaseException]:
        if _ON_LOOP.get():  # a fan-out inside a fan-out's job: on the same loop
            from dispatcher.client import aio

            return await aio.drive(jobs, limit)
        if len(jobs) <= 1 or limit <= 1:
            return one_by_one(jobs)
        return on_a_loop(jobs, limit)

    async def hook(self, hook: str, ctx: dict[str, Any], timeout: float) -> Decision:
        from agent.common.authhook import call_sync

        return call_sync(hook, ctx, timeout)

    async def sleep(self, seconds: float) -> None:
        if _ON_LOOP.get():
            import asyncio

            await asyncio.sleep(seconds)
        else:
            time.sleep(seconds)

    async def offload(self, fn: Callable[[], T], undo: Callable[[T], object] | None = None) -> T:
        return fn()  # nothing cancels it; on a fan-out's loop it holds the loop, briefly


BLOCKING = BlockingIO()
