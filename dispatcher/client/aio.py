"""One mTLS request to one agent over asyncio, as upstream's LWP client makes it.

The request, the TLS client (memory BIOs, so a cached session can be offered), reply
parsing and upstream's error strings live in :mod:`dispatcher.client.wire`; this module
connects with asyncio and moves the bytes. :data:`ASYNCIO` is the
:class:`~dispatcher.client.io.AgentIO` the operations use by default (the API daemon,
``ced`` verbs that fan out widely); :mod:`dispatcher.client.blocking` is the same over
plain sockets and threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from agent.common import authhook
from dispatcher.client.wire import (
    NO_DATA,
    READ_CHUNK,
    TRANSPORT_ERRORS,
    AgentReply,
    AgentRequest,
    Attempt,
    SessionCache,
    fmt_seconds,
    sessions_for,
)

__all__ = [
    "ASYNCIO",
    "NO_DATA",
    "AgentReply",
    "AgentRequest",
    "AsyncioIO",
    "SessionCache",
    "call",
    "fmt_seconds",
    "sessions_for",
]

R = TypeVar("R")
T = TypeVar("T")


async def _drive(a: Attempt) -> bytes:
    """Connect, then move the bytes :meth:`~dispatcher.client.wire.Attempt.exchange` asks for."""
    reader, writer = await asyncio.open_connection(a.req.address, a.req.port)
    try:
        steps = a.exchange()
        want = next(steps)
        while True:
            if want is None:
                data = await reader.read(READ_CHUNK)
            else:
                writer.write(want)
                await writer.drain()
                data = b""
            want = steps.send(data)
    except StopIteration as done:
        raw: bytes = done.value
        return raw
    finally:
        writer.close()


async def call(req: AgentRequest) -> AgentReply:
    """One request to one agent; never raises for transport or HTTP failures."""
    a = Attempt(req)
    try:
        async with asyncio.timeout(req.timeout):
            raw = await _drive(a)
    except TRANSPORT_ERRORS as exc:
        return a.failed(exc)
    return a.done(raw)


class AsyncioIO:
    """:class:`~dispatcher.client.io.AgentIO` on the running event loop."""

    call = staticmethod(call)

    async def gather(
        self, jobs: Sequence[Callable[[], Awaitable[R]]], limit: int
    ) -> list[R | BaseException]:
        sem = asyncio.Semaphore(max(1, limit))

        async def one(job: Callable[[], Awaitable[R]]) -> R:
            async with sem:
                return await job()

        return await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)

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
