"""Many agent requests on one thread: non-blocking sockets and one selector.

:data:`MULTIPLEX` is the :class:`~dispatcher.client.io.AgentIO` of the one-shot ``ced``
(:data:`dispatcher.client.blocking.BLOCKING` is this object). Its ``gather`` runs the jobs
(the operations' per-host coroutines) on one loop per core at most (the calling thread's,
plus a thread per further loop, only for fan-outs of more than 64 hosts): a job that
awaits :meth:`MultiplexIO.call` (or :meth:`MultiplexIO.sleep`) hands its request to its
loop and is resumed with the reply, so ``max_parallel`` requests are in flight without a
thread each. Threads cost here: with 2,000 in flight, thread start-up, stacks, GIL hand-offs
and the kernel's task switches made a ping of 2,000 agents 1.7 times slower than with
256 threads, and a 1 s script to 2,000 agents took 26 s.

The request itself is :class:`~dispatcher.client.wire.Attempt`'s (TLS over memory BIOs,
upstream's error strings); this module only connects and moves bytes, as
:mod:`dispatcher.client.blocking` does for one request: every address ``getaddrinfo``
gives is tried in turn, with ``TCP_NODELAY``; one deadline per request covers connect,
handshake, request and response. Neither asyncio nor threads are imported (``ced``'s
start-up budget); the soft ``RLIMIT_NOFILE`` is raised (up to the hard limit) when the
requests in flight need more descriptors, and the jobs in flight are capped at what it
allows.

A job may also await the other :class:`AgentIO` coroutines (the auth hook, offloaded
work): those complete at once, holding the loop, as they do in the blocking client.
"""

from __future__ import annotations

import contextvars
import errno
import heapq
import itertools
import os
import selectors
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from typing import Any, TypeVar

from dispatcher.client import blocking
from dispatcher.client.io import run_blocking
from dispatcher.client.wire import (
    READ_CHUNK,
    TRANSPORT_ERRORS,
    AgentReply,
    AgentRequest,
    Attempt,
    Exchange,
)

R = TypeVar("R")

#: requests at most in their CPU-bound part (connect, TLS handshake, writing the request)
#: at once, over all the loops of a fan-out; the others in flight wait for their answers.
#: New requests start only below it, so tens of thousands in flight never queue all
#: their handshakes (about 1 ms of CPU each), deadlines ticking, behind one another:
#: 1,024 is about a second of queued handshakes against a ``read_timeout`` of 60 s. (128
#: throttled a ping of 2,000 slow simulated agents to half the speed of no cap.)
OPENING = 1024

#: at most this many loops (threads) for one fan-out, and at least this many jobs each
MAX_LOOPS = 4
JOBS_PER_LOOP = 64

#: descriptors kept free for everything else the process has open (logs, the registry)
FD_RESERVE = 64


class _Wait:
    """What a job yields to the loop: a request to make, or a pause (seconds)."""

    __slots__ = ("what",)

    def __init__(self, what: AgentRequest | float) -> None:
        self.what = what

    def __await__(self) -> Generator[_Wait, Any, Any]:
        return (yield self)


_inside = threading.local()


def _in_loop() -> bool:
    return bool(getattr(_inside, "depth", 0))


class _Conn:
    """One request in flight: its socket, the exchange and what it waits for."""

    def __init__(self, job: _Job, req: AgentRequest) -> None:
        self.job = job
        self.attempt = Attempt(req)
        self.deadline = self.attempt.t0 + req.timeout
        self.sock: socket.socket | None = None
        self.infos: list[tuple[Any, ...]] = []
        self.errors: list[OSError] = []
        self.steps: Exchange | None = None
        self.out = b""  # bytes still to send
        self.connecting = False
        self.opening = True  # until the request is written
        self.finished = False


class _Job:
    __slots__ = ("coro", "ctx", "index")

    def __init__(
        self, index: int, coro: Coroutine[Any, Any, Any], ctx: contextvars.Context
    ) -> None:
        self.index = index
        self.coro = coro
        self.ctx = ctx


class _Queue:
    """The jobs not started yet, shared by the loops of one fan-out (in order)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.next = 0
        self.lock = threading.Lock()

    def take(self) -> int | None:
        with self.lock:
            if self.next >= self.count:
                return None
            self.next += 1
            return self.next - 1


class _Loop:
    """Runs jobs, at most ``limit`` at a time, until every one has finished."""

    def __init__(
        self,
        jobs: Sequence[Callable[[], Awaitable[R]]],
        limit: int,
        opening: int | None = None,
        queue: _Queue | None = None,
        results: list[Any] | None = None,
        base: contextvars.Context | None = None,
    ) -> None:
        self.jobs = jobs
        self.limit = max(1, limit)
        self.max_opening = max(1, OPENING if opening is None else opening)
        self.opening = 0
        self.queue = queue if queue is not None else _Queue(len(jobs))
        self.results: list[Any] = results if results is not None else [None] * len(jobs)
        self.base = base if base is not None else contextvars.copy_context()
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, _Job, _Conn | None]] = []
        self.seq = itertools.count()
        self.running = 0

    def run(self) -> list[Any]:
        try:
            while True:
                self._start_more()
                if not self.running:
                    break
                self._wait_once()
        finally:
            for key in list(self.sel.get_map().values()):
                conn: _Conn = key.data
                self._close(conn)
            self.sel.close()
        return self.results

    # ----- jobs ---------------------------------------------------------------------------

    def _start_more(self) -> None:
        while self.running < self.limit and self.opening < self.max_opening:
            i = self.queue.take()
            if i is None:
                return
            self.running += 1
            self._step(_Job(i, _await(self.jobs[i]), self.base.copy()), None)

    def _step(self, job: _Job, value: Any) -> None:
        """Resume ``job`` with ``value`` until it waits again or finishes (the loop
        starts the next jobs: no recursion however many finish at once)."""
        depth = getattr(_inside, "depth", 0)
        _inside.depth = depth + 1
        try:
            wait = job.ctx.run(job.coro.send, value)
        except StopIteration as done:
            self._finished(job, done.value)
            return
        except Exception as exc:
            self._finished(job, exc)
            return
        finally:
            _inside.depth = depth
        if not isinstance(wait, _Wait):
            job.coro.close()
            self._finished(job, RuntimeError(f"a job awaited {wait!r} (needs an event loop)"))
        elif isinstance(wait.what, AgentRequest):
            self._open(job, wait.what)
        else:
            self._timer(time.monotonic() + max(0.0, wait.what), job, None)

    def _finished(self, job: _Job, result: Any) -> None:
        self.results[job.index] = result
        self.running -= 1

    def _timer(self, when: float, job: _Job, conn: _Conn | None) -> None:
        heapq.heappush(self.timers, (when, next(self.seq), job, conn))

    # ----- requests -----------------------------------------------------------------------

    def _open(self, job: _Job, req: AgentRequest) -> None:
        conn = _Conn(job, req)
        self.opening += 1
        self._timer(conn.deadline, job, conn)
        try:
            conn.infos = blocking._addrinfo(req.address, req.port)
            self._connect_next(conn)
        except TRANSPORT_ERRORS as exc:
            self._fail(conn, exc)

    def _connect_next(self, conn: _Conn) -> None:
        """Start connecting to the next address; raise as blocking.connect when none is left."""
        while conn.infos:
            family, type_, proto, _, sockaddr = conn.infos.pop(0)
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                err = sock.connect_ex(sockaddr)
            except BaseException:
                sock.close()
                raise
            if err in (0, errno.EINPROGRESS, errno.EAGAIN):
                conn.sock, conn.connecting = sock, True
                self.sel.register(sock, selectors.EVENT_WRITE, conn)
                return
            sock.close()
            conn.errors.append(OSError(err, os.strerror(err)))
        errors = conn.errors
        if not errors:
            raise OSError("getaddrinfo() returned empty list")
        if len(errors) == 1 or all(str(e) == str(errors[0]) for e in errors):
            raise errors[0]
        raise OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")

    def _ready(self, conn: _Conn, events: int) -> None:
        try:
            if conn.connecting:
                self._connected(conn)
            elif conn.out:
                if self._send(conn):
                    assert conn.steps is not None
                    self._advance(conn, conn.steps.send(b""))
            else:
                assert conn.sock is not None and conn.steps is not None
                try:
                    data = conn.sock.recv(READ_CHUNK)
                except (BlockingIOError, InterruptedError):
                    return
                self._advance(conn, conn.steps.send(data))
        except StopIteration as done:
            self._done(conn, conn.attempt.done(done.value))
        except TRANSPORT_ERRORS as exc:
            self._fail(conn, exc)

    def _connected(self, conn: _Conn) -> None:
        sock = conn.sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.sel.unregister(sock)
            sock.close()
            conn.sock = None
            conn.errors.append(OSError(err, os.strerror(err)))
            self._connect_next(conn)
            return
        conn.connecting = False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.steps = conn.attempt.exchange()
        self._advance(conn, next(conn.steps))

    def _advance(self, conn: _Conn, want: bytes | None) -> None:
        """Do what the exchange asks (send ``want``, or read) until it must wait."""
        assert conn.sock is not None and conn.steps is not None
        while want is not None:
            conn.out = want
            if not self._send(conn):
                return
            want = conn.steps.send(b"")
        if conn.opening and conn.attempt.phase == "response":
            self._opened(conn)
        self.sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _send(self, conn: _Conn) -> bool:
        """Send what is pending; False when the socket is full (wait for it to drain)."""
        assert conn.sock is not None and conn.steps is not None
        try:
            while conn.out:
                n = conn.sock.send(conn.out)
                conn.out = conn.out[n:]
        except (BlockingIOError, InterruptedError):
            self.sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
            return False
        return True

    def _opened(self, conn: _Conn) -> None:
        conn.opening = False
        self.opening -= 1

    def _fail(self, conn: _Conn, exc: BaseException) -> None:
        self._done(conn, conn.attempt.failed(exc))

    def _done(self, conn: _Conn, reply: AgentReply) -> None:
        if conn.finished:
            return
        self._close(conn)
        conn.finished = True
        if conn.opening:
            self._opened(conn)
        self._step(conn.job, reply)

    def _close(self, conn: _Conn) -> None:
        if conn.sock is not None:
            try:
                self.sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.sock.close()
            conn.sock = None
        if conn.steps is not None:
            conn.steps.close()

    # ----- waiting ------------------------------------------------------------------------

    def _wait_once(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, job, conn = heapq.heappop(self.timers)
            if conn is None:
                self._step(job, None)
            elif not conn.finished:
                self._fail(conn, TimeoutError("timed out"))
        if not self.running:
            return
        timeout = max(0.0, self.timers[0][0] - now) if self.timers else None
        for key, events in self.sel.select(timeout):
            ready: _Conn = key.data
            if not ready.finished:
                self._ready(ready, events)


async def _await(job: Callable[[], Awaitable[R]]) -> R:
    return await job()


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


def loops_for(jobs: int, limit: int) -> int:
    """How many loops (threads) a fan-out gets: one per core up to :data:`MAX_LOOPS`, and
    one per :data:`JOBS_PER_LOOP` jobs; a small fan-out stays on the calling thread."""
    return max(1, min(os.cpu_count() or 1, MAX_LOOPS, jobs // JOBS_PER_LOOP, limit))


def drive(
    jobs: Sequence[Callable[[], Awaitable[R]]], limit: int, loops: int | None = None
) -> list[R | BaseException]:
    """Every job, at most ``limit`` in flight; results (or the exception each raised) in
    job order. Each job runs in a copy of the caller's context.

    With ``loops`` > 1 (by default :func:`loops_for`), that many loops share the jobs (in
    order, each taking the next when it has room) and the limits: the calling thread
    runs one, each other one a thread of its own, so the TLS work (which releases the
    GIL) spreads over the cores."""
    limit = fd_budget(max(1, limit))
    n = loops if loops is not None else loops_for(len(jobs), limit)
    if n <= 1:
        return _Loop(jobs, limit).run()
    queue, base = _Queue(len(jobs)), contextvars.copy_context()
    results: list[Any] = [None] * len(jobs)
    shares = [_Loop(jobs, -(-limit // n), -(-OPENING // n), queue, results, base)
              for _ in range(n)]  # fmt: skip
    failures: list[BaseException] = []

    def run(loop: _Loop) -> None:
        try:
            loop.run()
        except BaseException as exc:  # a loop's own failure (not a job's): raised below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(lp,), name=f"ced-fanout-{i}", daemon=True)
               for i, lp in enumerate(shares[1:], 1)]  # fmt: skip
    for t in threads:
        t.start()
    run(shares[0])
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return results


def gather(jobs: Sequence[Callable[[], Awaitable[R]]], limit: int) -> list[R | BaseException]:
    """:func:`drive`; a single job (or ``limit`` 1) runs as the blocking client would.

    Called from inside a job (a nested fan-out), it runs to its end before that job
    goes on."""
    depth = getattr(_inside, "depth", 0)
    _inside.depth = 0
    try:
        if len(jobs) == 1 or limit <= 1:
            return blocking.gather(jobs, limit)
        return drive(jobs, limit)
    finally:
        _inside.depth = depth


class MultiplexIO(blocking.BlockingIO):
    """:class:`~dispatcher.client.blocking.BlockingIO` whose fan-outs share one thread.

    Outside :meth:`gather` (one request, the auth hook) it is the blocking client.
    """

    async def call(self, req: AgentRequest) -> AgentReply:
        if _in_loop():
            reply: AgentReply = await _Wait(req)
            return reply
        return blocking.call(req)

    async def gather(
        self, jobs: Sequence[Callable[[], Awaitable[R]]], limit: int
    ) -> list[R | BaseException]:
        return gather(jobs, limit)

    async def sleep(self, seconds: float) -> None:
        if _in_loop():
            await _Wait(float(seconds))
        else:
            time.sleep(seconds)


MULTIPLEX = MultiplexIO()

__all__ = ["MULTIPLEX", "MultiplexIO", "drive", "fd_budget", "gather", "run_blocking"]
