"""Agent stand-ins on loopback for fan-out tests: TLS listeners on an event loop of their own.

Each listener has a behaviour: ``answer`` (read the request, wait ``delay``, answer a JSON
body), ``trickle`` (read the request, then send one byte of a response every 0.1 s and
never finish) or ``silent`` (accept TCP, say nothing: no TLS). The listeners count the
connections open at once (``peak``) and keep the request paths they read (``seen``), so a
test can show what an attacker's listener did or did not receive. Pytest-free.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable

from agent.common.wire import read_request, response_bytes

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Listener:
    """One listener's counters (read on the test's thread after the fan-out)."""

    def __init__(self, behaviour: str, delay: float) -> None:
        self.behaviour = behaviour
        self.delay = delay
        self.port = 0
        self.live = 0
        self.peak = 0
        self.seen: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.live += 1
        self.peak = max(self.peak, self.live)
        try:
            if self.behaviour == "silent":
                await asyncio.sleep(60)
                return
            req = await read_request(reader)
            self.seen.append(req.path)
            if self.behaviour == "trickle":
                head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
                for i in range(600):  # at most a minute
                    writer.write(head[i : i + 1] if i < len(head) else b"x")
                    await writer.drain()
                    await asyncio.sleep(0.1)
                return
            await asyncio.sleep(self.delay)
            writer.write(response_bytes(200, {"status": "ok", "path": req.path}))
            await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        finally:
            self.live -= 1
            writer.close()


class TlsAgents:
    """Listeners on 127.0.0.1 served by one event loop on a daemon thread; ``stop()`` ends it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[asyncio.Server] = []

    def add(self, ctx: ssl.SSLContext | None, behaviour: str = "answer",
            delay: float = 0.0) -> Listener:  # fmt: skip
        """A new listener (``ctx`` None: plain TCP); returns it with its port set."""
        lst = Listener(behaviour, delay)

        async def start() -> asyncio.Server:
            return await asyncio.start_server(lst.handle, "127.0.0.1", 0,
                                              ssl=None if behaviour == "silent" else ctx,
                                              backlog=512)  # fmt: skip

        srv = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.servers.append(srv)
        lst.port = int(srv.sockets[0].getsockname()[1])
        return lst

    def stop(self) -> None:
        async def close() -> None:
            for srv in self.servers:
                srv.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
