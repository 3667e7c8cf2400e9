"""How the operations reach agents: on an event loop, or blocking for the one-shot ``ced``.

:mod:`dispatcher.operations`, :mod:`dispatcher.client.fanout` and :mod:`dispatcher.pki.renewal`
are written once, as coroutines, over an :class:`AgentIO`. Two implementations exist:

* :data:`dispatcher.client.aio.ASYNCIO` (the default, the API daemon's): asyncio
  connections, :func:`~dispatcher.client.aio.drive` for a fan-out (bounded, each job a
  task), the auth hook as an asyncio subprocess;
* :data:`dispatcher.client.blocking.BLOCKING` (the one-shot ``ced``'s): a blocking socket
  for one request, the hook through ``subprocess``, and a fan-out of more than one host on
  the same asyncio engine, on a loop of its own. Outside a fan-out its coroutines never
  suspend, so :func:`run_blocking` runs an operation to completion without an event
  loop, and ``ced run`` to one host never imports asyncio (about 50 ms of start-up on a
  small machine).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from agent.common.authhook import Decision
    from dispatcher.client.wire import AgentReply, AgentRequest

R = TypeVar("R")
T = TypeVar("T")


class AgentIO(Protocol):
    async def call(self, req: AgentRequest) -> AgentReply:
        """One request to one agent; never raises for transport or HTTP failures."""
        ...

    async def gather(
        self, jobs: Sequence[Callable[[], Awaitable[R]]], limit: int
    ) -> list[R | BaseException]:
        """Every job, at most ``limit`` at a time; results (or exceptions) in job order."""
        ...

    async def hook(self, hook: str, ctx: dict[str, Any], timeout: float) -> Decision:
        """Run the auth hook (:mod:`agent.common.authhook`)."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    async def offload(self, fn: Callable[[], T], undo: Callable[[T], object] | None = None) -> T:
        """Blocking work that may wait on the network (the coordination store: run locks,
        run records), kept off the event loop so a slow or frozen etcd never stalls it.

        The work always runs to its end; when the caller is cancelled meanwhile, ``undo``
        gets its result (a lock taken for nobody is released)."""
        ...


def resolve_io(io: AgentIO | None) -> AgentIO:
    """``io``, or the asyncio implementation (imported on first use)."""
    if io is not None:
        return io
    from dispatcher.client.aio import ASYNCIO

    return ASYNCIO


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (every ``await`` in it completes at once).

    That holds for the operations over :data:`dispatcher.client.blocking.BLOCKING`; a
    coroutine that does suspend (it waits for an event loop) is closed and refused.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("run_blocking: the coroutine suspended (it needs an event loop)")
