"""The fan-out's opening slots: a cap, first come first served, and no slot lost to a
waiter cancelled before or after it was handed one."""

from __future__ import annotations

import asyncio

from dispatcher.client.aio import Slots


def test_cap_and_order() -> None:
    async def main() -> tuple[list[int], int]:
        slots = Slots(2)
        held = 0
        most = 0
        order: list[int] = []

        async def job(i: int) -> None:
            nonlocal held, most
            await slots.acquire()
            held += 1
            most = max(most, held)
            order.append(i)
            await asyncio.sleep(0)
            held -= 1
            slots.release()

        await asyncio.gather(*(job(i) for i in range(50)))
        return order, most

    order, most = asyncio.run(main())
    assert most == 2
    assert order == list(range(50))


def test_cancelled_waiters_lose_no_slot() -> None:
    async def main() -> int:
        slots = Slots(1)
        await slots.acquire()  # the one slot is held
        waiting = [asyncio.ensure_future(slots.acquire()) for _ in range(3)]
        await asyncio.sleep(0)
        waiting[0].cancel()  # cancelled while waiting: skipped
        await asyncio.sleep(0)
        slots.release()  # handed to waiting[1] ...
        waiting[1].cancel()  # ... cancelled before it resumed: passed on to waiting[2]
        await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 10)
        assert waiting[0].cancelled() and waiting[1].cancelled()
        assert waiting[2].done() and not waiting[2].cancelled()
        slots.release()  # waiting[2] is done with it
        return slots.free

    assert asyncio.run(main()) == 1
