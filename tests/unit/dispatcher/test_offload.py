"""AgentIO.offload: store calls off the event loop; a lock taken for a cancelled request is
released, never leaked."""

from __future__ import annotations

import asyncio
import threading
import time

from dispatcher.client.aio import ASYNCIO
from dispatcher.client.blocking import BLOCKING
from dispatcher.client.io import run_blocking


def test_the_loop_keeps_ticking_while_the_work_blocks() -> None:
    async def main() -> tuple[str, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        out = await ASYNCIO.offload(lambda: (time.sleep(0.3), "done")[1])
        t.cancel()
        return out, ticks

    out, ticks = asyncio.run(main())
    assert out == "done" and ticks >= 10


def test_a_cancelled_caller_gets_its_result_undone() -> None:
    undone: list[str] = []
    done = threading.Event()

    def undo(token: str) -> None:
        undone.append(token)
        done.set()

    async def main() -> None:
        caller = asyncio.create_task(
            ASYNCIO.offload(lambda: (time.sleep(0.2), "lock-1")[1], undo=undo)
        )
        await asyncio.sleep(0.05)
        caller.cancel()
        try:
            await caller
        except asyncio.CancelledError:
            pass
        await asyncio.to_thread(done.wait, 5)

    asyncio.run(main())
    assert undone == ["lock-1"]


def test_the_blocking_driver_runs_it_inline() -> None:
    async def op() -> int:
        return await BLOCKING.offload(lambda: threading.get_ident())

    assert run_blocking(op()) == threading.get_ident()
