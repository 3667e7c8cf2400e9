"""Rolling execution (dispatcher/rolling.py): the option values, the wave planner, the
failure gate, and waves over the real fan-out with an in-memory AgentIO."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from dispatcher.ced.live import Live, recap
from dispatcher.client import fanout
from dispatcher.client.io import run_blocking
from dispatcher.client.wire import AgentReply
from dispatcher.registry import Target
from dispatcher.rolling import Gate, Rolled, Rolling, Size, in_waves, parse_size
from tests.unit.dispatcher.test_ced_live import FakeAgents, _reach, _targets

Result = dict[str, Any]


# ----- values --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    ("1", Size(1)), ("25", Size(25)), (" 7 ", Size(7)), (3, Size(3)),
    ("1%", Size(1, True)), ("50%", Size(50, True)), ("100%", Size(100, True)),
])  # fmt: skip
def test_sizes(text: object, size: Size) -> None:
    assert parse_size(text, "--batch") == size


@pytest.mark.parametrize(("text", "why"), [
    ("0", "at least 1"), ("0%", "at least 1"), ("150%", "at most 100%"), ("101%", "at most 100%"),
    ("abc", "expected a number"), ("-1", "expected a number"), ("1.5", "expected a number"),
    ("", "expected a number"), ("%", "expected a number"), ("5%%", "expected a number"),
    (True, "expected a number"), (None, "expected a number"), ("9" * 12, "expected a number"),
])  # fmt: skip
def test_bad_sizes_are_clear_errors(text: object, why: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_size(text, "--max-fail")
    assert str(exc.value).startswith("--max-fail: ") and why in str(exc.value)


def test_policy_from_options() -> None:
    assert Rolling.parse() is None
    assert Rolling.parse(batch="2") == Rolling(Size(2), None)
    assert Rolling.parse(max_fail="10%") == Rolling(None, Size(10, True))
    assert Rolling.parse(fail_fast=True) == Rolling(None, Size(1))
    assert Rolling.parse(max_fail="1", fail_fast=True) == Rolling(None, Size(1))
    with pytest.raises(ValueError, match="--fail-fast is --max-fail 1"):
        Rolling.parse(max_fail="2", fail_fast=True)
    with pytest.raises(ValueError, match=r"^max_fail: must be at least 1"):
        Rolling.parse(max_fail=0, names=("batch", "max_fail", "fail_fast"))


# ----- the planner -----------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "total", "waves"), [
    (None, 5, [5]), ("2", 5, [2, 2, 1]), ("1", 3, [1, 1, 1]), ("10", 3, [3]), ("5", 5, [5]),
    ("40%", 5, [2, 2, 1]), ("10%", 5, [1, 1, 1, 1, 1]), ("100%", 5, [5]), ("34%", 3, [2, 1]),
    ("2", 0, []), ("25%", 10_000, [2500] * 4),
])  # fmt: skip
def test_waves(batch: str | None, total: int, waves: list[int]) -> None:
    policy = Rolling(parse_size(batch, "--batch") if batch else None)
    assert policy.waves(total) == waves
    assert sum(waves) == total


@pytest.mark.parametrize(("max_fail", "total", "budget"), [
    (None, 5, None), ("1", 5, 1), ("3", 2, 3), ("10%", 5, 1), ("50%", 5, 3), ("100%", 4, 4),
])  # fmt: skip
def test_budget(max_fail: str | None, total: int, budget: int | None) -> None:
    policy = Rolling(None, parse_size(max_fail, "--max-fail") if max_fail else None)
    assert policy.budget(total) == budget


def test_gate_counts_failed_and_unreachable_only() -> None:
    gate = Gate(2)
    for outcome in ("ok", "denied", "locked", "unknown", "skipped", "failed"):
        gate.saw(outcome)
        assert gate.admit()
    gate.saw("unreachable")
    assert not gate.admit() and gate.closed
    assert gate.reason() == "not started: --max-fail 2 reached (2 failed or unreachable)"
    never = Gate(None)
    for _ in range(50):
        never.saw("failed")
    assert never.admit()


# ----- in_waves with a scripted fan-out --------------------------------------------------------


def _fake_wave(fail: set[str], log: list[tuple[int, list[str]]]) -> Any:
    """One host at a time, asking the gate first (as the fan-out does with max_parallel 1)."""

    async def wave(part: Sequence[str], gate: Gate, told: fanout.OnResult) -> list[Result]:
        log.append((len(log) + 1, list(part)))
        out = []
        for name in part:
            if not gate.admit():
                res, outcome = fanout.run_skipped("s", "r", name, gate.reason()), "skipped"
            else:
                bad = name in fail
                res, outcome = {"host": name, "exit": 1 if bad else 0}, "failed" if bad else "ok"
            told(res, outcome)
            out.append(res)
        return out

    return wave


def _roll(names: list[str], policy: Rolling | None, fail: set[str]) -> tuple[Rolled, Any]:
    log: list[tuple[int, list[str]]] = []
    seen: list[tuple[str, str]] = []
    waves: list[tuple[int, int, int]] = []
    rolled = run_blocking(in_waves(
        names, policy, _fake_wave(fail, log), lambda n, why: fanout.run_skipped("s", "r", n, why),
        lambda r, o: seen.append((r["host"], o)), lambda *w: waves.append(w)))  # fmt: skip
    return rolled, (log, seen, waves)


def test_a_failure_in_wave_one_stops_wave_two() -> None:
    names = ["a", "b", "c", "d", "e"]
    rolled, (log, seen, waves) = _roll(names, Rolling.parse("2", "1"), {"b"})
    assert log == [(1, ["a", "b"])]  # waves 2 and 3 never began
    assert waves == [(1, 3, 2)]
    assert [r["host"] for r in rolled.results] == names
    assert [r.get("status") for r in rolled.results] == [None, None, "skipped", "skipped",
                                                         "skipped"]  # fmt: skip
    assert [r["wave"] for r in rolled.results] == [1, 1, 2, 2, 3]
    assert dict(seen) == {"a": "ok", "b": "failed", "c": "skipped", "d": "skipped",
                          "e": "skipped"}  # fmt: skip
    assert (rolled.waves, rolled.started_waves, rolled.stopped, rolled.skipped) == (3, 1, True, 3)
    assert rolled.summary(Rolling(Size(2), Size(1))) == {
        "batch": "2", "max_fail": "1", "waves": 3, "waves_started": 1, "stopped": True,
        "skipped": 3}  # fmt: skip
    skipped = rolled.results[2]
    assert skipped["exit"] == -1 and skipped["error"].startswith("not started: --max-fail 1")


def test_budget_inside_a_wave_stops_the_hosts_not_yet_started() -> None:
    rolled, (log, seen, _) = _roll(["a", "b", "c", "d"], Rolling.parse(fail_fast=True), {"b"})
    assert log == [(1, ["a", "b", "c", "d"])]  # no batch: one wave
    assert seen == [("a", "ok"), ("b", "failed"), ("c", "skipped"), ("d", "skipped")]
    assert all("wave" not in r for r in rolled.results)


def test_a_budget_not_spent_runs_every_wave() -> None:
    rolled, (log, seen, waves) = _roll(list("abcde"), Rolling.parse("2", "2"), {"b"})
    assert [w for w, _ in log] == [1, 2, 3] and waves == [(1, 3, 2), (2, 3, 2), (3, 3, 1)]
    assert not rolled.stopped and rolled.skipped == 0
    assert sum(1 for _, o in seen if o == "failed") == 1


def test_without_a_policy_failures_never_stop_anything() -> None:
    rolled, (log, seen, waves) = _roll(list("abc"), None, {"a", "b", "c"})
    assert log == [(1, ["a", "b", "c"])] and waves == [(1, 1, 3)]
    assert [o for _, o in seen] == ["failed"] * 3 and not rolled.stopped


# ----- over the real fan-out (threads, as ced) ---------------------------------------------------


def _run(
    targets: list[Target], agents: FakeAgents, policy: Rolling | None, parallel: int = 8
) -> tuple[Rolled, list[tuple[str, str]]]:
    reach = _reach(agents, parallel)
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def on_result(r: Result, outcome: str) -> None:
        with lock:
            seen.append((r["host"], outcome))

    async def wave(part: Sequence[Target], gate: Gate, told: fanout.OnResult) -> list[Result]:
        return await fanout.run_all(part, "s", [], "r1", "", "", reach, on_result=told, gate=gate)

    rolled = run_blocking(in_waves(targets, policy, wave,
                                   lambda n, why: fanout.run_skipped("s", "r1", n, why),
                                   on_result))  # fmt: skip
    return rolled, seen


class Tracking(FakeAgents):
    """Records how many requests are in flight at once."""

    def __init__(self, replies: dict[str, tuple[float, AgentReply]]) -> None:
        super().__init__(replies)
        inner = self.call
        self.now = self.peak = 0
        self.lock = threading.Lock()

        async def call(req: Any) -> AgentReply:
            with self.lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                return await inner(req)
            finally:
                with self.lock:
                    self.now -= 1

        self.call = call  # type: ignore[method-assign]


def test_batch_bounds_the_hosts_in_flight() -> None:
    names = [f"h{i}" for i in range(7)]
    agents = Tracking({n: (0.05, AgentReply(200, {"exit": 0}, 50)) for n in names})
    t0 = time.monotonic()
    rolled, seen = _run(_targets(*names), agents, Rolling.parse("3"))
    assert agents.peak == 3 and rolled.waves == 3 and len(seen) == 7
    assert [r["wave"] for r in rolled.results] == [1, 1, 1, 2, 2, 2, 3]
    assert time.monotonic() - t0 >= 0.15  # three waves, one after the other
    print(f"[rolling] 7 hosts, --batch 3: peak in flight {agents.peak}, 3 waves")


def test_fail_fast_over_the_fanout_with_one_at_a_time() -> None:
    agents = FakeAgents({
        "a": (0.0, AgentReply(200, {"exit": 0}, 1)),
        "b": (0.0, AgentReply(None, None, 1, "host 'b' did not respond - connection refused")),
        "c": (0.0, AgentReply(200, {"exit": 0}, 1)),
    })  # fmt: skip
    called: list[str] = []
    inner = agents.call

    async def spy(req: Any) -> AgentReply:
        called.append(req.name)
        return await inner(req)

    agents.call = spy  # type: ignore[method-assign]
    rolled, seen = _run(_targets("a", "b", "c"), agents, Rolling.parse(fail_fast=True), 1)
    assert called == ["a", "b"]  # c was never asked
    assert seen == [("a", "ok"), ("b", "unreachable"), ("c", "skipped")]
    assert rolled.results[2]["status"] == "skipped" and rolled.skipped == 1


def test_live_shows_the_wave_and_the_recap_says_where_it_stopped() -> None:
    import io

    stream = io.StringIO()
    live = Live(progress=stream)
    live.expect(3)
    live.wave(1, 2, 2)
    live({"host": "a", "exit": 0, "rtt": "5ms"}, "ok")
    live({"host": "b", "exit": 1, "rtt": "6ms"}, "failed")
    live(fanout.run_skipped("s", "r", "c", "not started: --max-fail 1 reached"), "skipped")
    live.close()
    text = stream.getvalue()
    assert "wave 1/2: 2 hosts\n" in text
    assert "[3/3] wave 1/2  ok 1  failed 1  unreachable 0  skipped 1  elapsed" in text
    summary = {"batch": "2", "max_fail": "1", "waves": 2, "waves_started": 1, "stopped": True,
               "skipped": 1}  # fmt: skip
    lines = recap(live.done, live.counts, 0.5, summary)
    assert lines[0] == ("--- 3 hosts in 0.5s: 1 ok, 1 failed, 0 unreachable, 0 denied, "
                        "0 locked, 0 unknown, 1 skipped")  # fmt: skip
    assert lines[1] == ("waves: 1/2 started of 2, --max-fail 1: stopped, 1 host(s) never "
                        "started (skipped)")  # fmt: skip
    assert "skipped: c" in lines
