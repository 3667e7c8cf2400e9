"""Agent requests on an asyncio event loop: one request, and a fan-out of many.

The request, the TLS client (memory BIOs, so a cached session can be offered), reply
parsing and upstream's error strings live in :mod:`dispatcher.client.wire`; this module
connects with asyncio and moves the bytes, with one :class:`asyncio.Protocol` per
connection (no stream reader or writer: each chunk the kernel hands over goes straight to
:meth:`~dispatcher.client.wire.Attempt.exchange`). One deadline per request covers
connect, handshake, request and response.

:data:`ASYNCIO` is the :class:`~dispatcher.client.io.AgentIO` of the API daemon (and the
default of the operations); ``ced`` (:data:`dispatcher.client.blocking.BLOCKING`) runs its
fan-outs of more than one host through :func:`drive` on a loop of their own.

:func:`drive` keeps at most ``limit`` jobs running (a task each, started as others finish,
each in a copy of the caller's context) and at most :data:`OPENING` requests in their
CPU-bound part (connect, TLS handshake, writing the request) at once, so tens of
thousands in flight never queue all their handshakes (about 1 ms of CPU each) behind one
another with their deadlines ticking.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

from agent.common import authhook
from dispatcher.client.wire import (
    NO_DATA,
    READ_CHUNK,
    TRANSPORT_ERRORS,
    AgentReply,
    AgentRequest,
    Attempt,
    Exchange,
    SessionCache,
    fmt_seconds,
    sessions_for,
)

__all__ = [
    "ASYNCIO",
    "NO_DATA",
    "OPENING",
    "AgentReply",
    "AgentRequest",
    "AsyncioIO",
    "SessionCache",
    "call",
    "drive",
    "fd_budget",
    "fmt_seconds",
    "sessions_for",
]

R = TypeVar("R")
T = TypeVar("T")

#: requests at most in their CPU-bound part (connect, handshake, writing the request) at
#: once on one loop; the others wait for a slot, the ones past it wait for their answers.
#: 1,024 queued handshakes are about a second of CPU against a ``read_timeout`` of 60 s
#: (128 throttled a ping of 2,000 slow simulated agents to half the speed of no cap).
OPENING = 1024

#: descriptors kept free for everything else the process has open (logs, the registry)
FD_RESERVE = 64


class Slots:
    """At most ``n`` holders at once; a released slot goes to the longest waiter, in O(1).

    Not :class:`asyncio.Semaphore`: Python 3.11's wakes a waiter by scanning its queue
    from the front, past every waiter already woken but not yet resumed, and each resumed
    one then removes itself from that queue; when many requests end in one pass of the
    loop, that is quadratic (a ping of 10,000 agents made 2.9 million
    ``Future.done()`` calls, about a tenth of the dispatcher's CPU, under cProfile)."""

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.free > 0:
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a slot as it was cancelled
                self.release()
            raise

    def release(self) -> None:
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():  # a cancelled waiter gave up its place
                fut.set_result(None)
                return
        self.free += 1


#: each loop's opening slots (kept with the loop)
_opening: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Slots] = weakref.WeakKeyDictionary()


#: what the connections of a thread's loop read into (each chunk is fed to its TLS object
#: at once, which copies it): no buffer allocated per read, none shared between threads
_into = threading.local()


def _read_buffer() -> memoryview:
    view: memoryview | None = getattr(_into, "view", None)
    if view is None:
        view = _into.view = memoryview(bytearray(READ_CHUNK))
    return view


class _Exchange(asyncio.BufferedProtocol):
    """One connection: feeds what arrives to the exchange, writes what it asks to send."""

    def __init__(self, a: Attempt, done: asyncio.Future[bytes], opened: Callable[[], None]) -> None:
        self.a = a
        self.done = done
        self.opened: Callable[[], None] | None = opened
        self.steps: Exchange | None = None
        self.transport: asyncio.Transport | None = None
        self.into = _read_buffer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not a subclass of asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)
        self.steps = self.a.exchange()
        self._step(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.into

    def buffer_updated(self, nbytes: int) -> None:
        self._step(self.into[:nbytes])

    def eof_received(self) -> bool:
        self._step(b"")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self._end(exc if exc is not None else ConnectionResetError("connection lost"))

    def _step(self, data: bytes | memoryview | None) -> None:
        if self.done.done():
            return
        steps, transport = self.steps, self.transport
        assert steps is not None and transport is not None
        try:
            want = next(steps) if data is None else steps.send(data)
            while want is not None:
                transport.write(want)
                want = steps.send(b"")
        except StopIteration as finished:
            self._end(None, finished.value)
            return
        except TRANSPORT_ERRORS as exc:
            self._end(exc)
            return
        if self.opened is not None and self.a.phase == "response":
            self.opened()
            self.opened = None

    def _end(self, exc: BaseException | None, raw: bytes = b"") -> None:
        if self.opened is not None:
            self.opened()
            self.opened = None
        if exc is None:
            self.done.set_result(raw)
        else:
            self.done.set_exception(exc)
        if self.steps is not None:
            self.steps.close()
        if self.transport is not None:
            self.transport.abort()


async def _exchange(
    a: Attempt, loop: asyncio.AbstractEventLoop, opened: Callable[[], None]
) -> bytes:
    """Connect (every address in turn, ``TCP_NODELAY``), then run the exchange."""
    done: asyncio.Future[bytes] = loop.create_future()
    req = a.req
    transport, _ = await loop.create_connection(lambda: _Exchange(a, done, opened),
                                                req.address, req.port)  # fmt: skip
    try:
        return await done
    finally:
        transport.abort()


async def call(req: AgentRequest) -> AgentReply:
    """One request to one agent; never raises for transport or HTTP failures.

    Inside :func:`drive` it first waits for one of the loop's opening slots (given back
    once the request is written, or the request ends); its deadline starts after that,
    as the request does."""
    loop = asyncio.get_running_loop()
    sem = _opening.get(loop)
    released = sem is None

    def opened() -> None:
        nonlocal released
        if not released:
            released = True
            assert sem is not None
            sem.release()

    if sem is not None:
        await sem.acquire()
    try:
        a = Attempt(req)
        try:
            async with asyncio.timeout(req.timeout):
                raw = await _exchange(a, loop, opened)
        except TRANSPORT_ERRORS as exc:
            return a.failed(exc)
        return a.done(raw)
    finally:
        opened()


async def _await(job: Callable[[], Awaitable[R]]) -> R:
    return await job()


async def drive(
    jobs: Sequence[Callable[[], Awaitable[R]]], limit: int, opening: int | None = None
) -> list[R | BaseException]:
    """Every job, at most ``limit`` running (and no more than the descriptors
    :func:`fd_budget` allows); results (or the exception each raised) in job order.

    Each job is a task in a copy of the caller's context, started as another ends (from
    the loop's callbacks: no recursion however many end at once); cancelling the caller
    cancels the running ones and starts no more. ``opening`` sets this loop's
    :data:`OPENING`."""
    loop = asyncio.get_running_loop()
    limit = fd_budget(max(1, limit))
    if opening is not None or loop not in _opening:
        _opening[loop] = Slots(max(1, OPENING if opening is None else opening))
    results: list[Any] = [None] * len(jobs)
    base = contextvars.copy_context()
    todo = iter(range(len(jobs)))
    running: dict[asyncio.Task[R], int] = {}
    all_done: asyncio.Future[None] = loop.create_future()

    def finished(task: asyncio.Task[R]) -> None:
        i = running.pop(task)
        if task.cancelled():
            results[i] = asyncio.CancelledError()
        else:
            exc = task.exception()
            results[i] = exc if exc is not None else task.result()
        start()

    def start() -> None:
        while len(running) < limit and not all_done.done():
            i = next(todo, None)
            if i is None:
                break
            task = loop.create_task(_await(jobs[i]), context=base.copy())
            running[task] = i
            task.add_done_callback(finished)
        if not running and not all_done.done():
            all_done.set_result(None)

    start()
    try:
        await all_done
    except BaseException:
        for task in list(running):
            task.cancel()
        raise
    return results


def fd_budget(wanted: int) -> int:
    """Requests that may be in flight at once: ``wanted``, raising the soft descriptor
    limit towards it (never past the hard one), less :data:`FD_RESERVE`."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


class AsyncioIO:
    """:class:`~dispatcher.client.io.AgentIO` on the running event loop."""

    call = staticmethod(call)

    async def gather(
        self, jobs: Sequence[Callable[[], Awaitable[R]]], limit: int
    ) -> list[R | BaseException]:
        return await drive(jobs, limit)

    async def hook(self, hook: str, ctx: dict[str, Any], timeout: float) -> authhook.Decision:
        return await authhook.call(hook, ctx, timeout)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def offload(self, fn: Callable[[], T], undo: Callable[[T], object] | None = None) -> T:
        work = asyncio.ensure_future(asyncio.to_thread(fn))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if undo is not None:
                work.add_done_callback(lambda w: _undo_later(w, undo))
            raise


def _undo_later(work: asyncio.Future[T], undo: Callable[[T], object]) -> None:
    """``undo`` the result of offloaded work whose caller went away (in a thread)."""
    if not work.cancelled() and work.exception() is None:
        asyncio.get_running_loop().run_in_executor(None, undo, work.result())


ASYNCIO = AsyncioIO()
