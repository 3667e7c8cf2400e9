"""``max_result_output``: each host's stdout/stderr kept in a run's results is bounded."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from agent.common.authhook import Decision
from dispatcher.client import fanout
from dispatcher.client.io import run_blocking
from dispatcher.client.wire import AgentReply, AgentRequest
from dispatcher.registry import Target

R = TypeVar("R")
T = TypeVar("T")


class FakeIO:
    """Agents answering a run with 1 MB of stdout and 10 bytes of stderr (in memory)."""

    def __init__(self) -> None:
        self.calls = 0

    async def call(self, req: AgentRequest) -> AgentReply:
        self.calls += 1
        body = {"host": req.address, "exit": 0, "stdout": "x" * 1_000_000, "stderr": "e" * 10,
                "reqid": "r1"}  # fmt: skip
        return AgentReply(200, body, 1)

    async def gather(
        self, jobs: Sequence[Callable[[], Awaitable[R]]], limit: int
    ) -> list[R | BaseException]:
        return [await j() for j in jobs]

    async def hook(self, hook: str, ctx: dict[str, Any], timeout: float) -> Decision:
        raise AssertionError("no hook here")

    async def sleep(self, seconds: float) -> None:
        return None

    async def offload(self, fn: Callable[[], T], undo: Callable[[T], object] | None = None) -> T:
        return fn()


def _run(max_output: int) -> list[dict[str, Any]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    reach = fanout.Reach(ctx, 5, 4, 10, io=FakeIO(), max_output=max_output)
    targets = [Target(f"h{i}", f"10.0.0.{i}", 7443) for i in range(3)]
    return run_blocking(fanout.run_all(targets, "s", [], "r1", "", "", reach))


def test_output_capped_per_host_and_flagged() -> None:
    results = _run(4096)
    assert len(results) == 3
    for r in results:
        assert len(r["stdout"]) == 4096 and r["stdout_truncated"] is True
        assert r["stderr"] == "e" * 10 and "stderr_truncated" not in r
        assert r["exit"] == 0


def test_no_cap_by_default_as_upstream() -> None:
    r = _run(0)[0]
    assert len(r["stdout"]) == 1_000_000 and "stdout_truncated" not in r
