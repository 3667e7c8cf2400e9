"""The leader's rebroadcast round runs beside its request loop: agents that do not answer
(powered off: each call waits its timeout) hold up no approval; actions that change or
tell the serials wait for the round, one at a time."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from dispatcher.ha import actions
from dispatcher.ha.leaderwork import LeaderWork


class SlowAgents:
    """``actions.perform`` with a broadcast that takes ``hold`` s (agents not answering)."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.log: list[tuple[str, float, float]] = []
        self.lock = threading.Lock()

    def perform(self, d: Any, name: str, args: dict[str, Any] | None = None) -> Any:
        t0 = time.monotonic()
        if name == "broadcast":
            time.sleep(self.hold)
        with self.lock:
            self.log.append((name, t0, time.monotonic()))
        data = {"serial": "AB", "updated": ["web1"], "failed": []} if name == "broadcast" else {}
        return actions.ActionResult(name, data)


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> tuple[LeaderWork, SlowAgents]:
    agents = SlowAgents(hold=1.0)
    monkeypatch.setattr(actions, "perform", agents.perform)
    node = SimpleNamespace(instance_id="a")
    return LeaderWork(node, SimpleNamespace()), agents  # type: ignore[arg-type]


def test_a_slow_round_holds_up_no_approval(work: tuple[LeaderWork, SlowAgents]) -> None:
    lw, agents = work
    rotation = SimpleNamespace(unacknowledged=lambda d, state: ["web1"])
    state = SimpleNamespace(unfinished=False)
    t0 = time.monotonic()
    lw._broadcast_check(rotation, state)
    assert time.monotonic() - t0 < 0.2 and lw.rebroadcasting()
    lw._broadcast_check(rotation, state)  # one round at a time
    lw.execute("approve", {"reqid": "r1"})  # served meanwhile
    approve = next(e for e in agents.log if e[0] == "approve")
    assert approve[2] - t0 < 0.5, "an approval waited for the round"
    lw.execute("rotate-cert", {})  # changes the serials: after the round
    assert lw._round is not None
    lw._round.join(5)
    names = [e[0] for e in agents.log]
    assert names.count("broadcast") == 1
    rotate = next(e for e in agents.log if e[0] == "rotate-cert")
    bcast = next(e for e in agents.log if e[0] == "broadcast")
    assert rotate[1] >= bcast[2] - 0.01, "rotate-cert ran during the round"
    assert not lw.rebroadcasting()


def test_a_failed_round_is_logged_and_the_next_one_starts(
    work: tuple[LeaderWork, SlowAgents], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    lw, agents = work

    def fenced(d: Any, name: str, args: Any = None) -> Any:
        raise RuntimeError("fenced: not the leader")

    monkeypatch.setattr(actions, "perform", fenced)
    rotation = SimpleNamespace(unacknowledged=lambda d, state: ["web1"])
    state = SimpleNamespace(unfinished=False)
    lw._broadcast_check(rotation, state)
    assert lw._round is not None
    lw._round.join(5)
    assert not lw.rebroadcasting()
    assert "ACTION=serial-rebroadcast" in caplog.text and "not the leader" in caplog.text
    monkeypatch.setattr(actions, "perform", agents.perform)
    agents.hold = 0.0
    lw._broadcast_check(rotation, state)
    assert lw._round is not None
    lw._round.join(5)
    assert [e[0] for e in agents.log] == ["broadcast"]
