"""Rolling execution: waves (``--batch N|N%``) and a failure budget (``--max-fail N|N%``).

A :class:`Rolling` policy cuts the targets into waves of ``batch`` hosts (the last one
may be smaller); the next wave starts only when every host of the current one has
finished. The failure budget counts hosts that came to ``failed`` or ``unreachable``;
once it is spent no new host is started (those already running finish), and every host
never started comes back as a per-host result with ``status: skipped`` and the outcome
``skipped``. ``--fail-fast`` is ``--max-fail 1``.

``N%`` is a share of the resolved targets (unknown references excluded), rounded up and
never below 1. Without a policy a run is one wave and nothing is ever skipped.

:func:`in_waves` drives an operation's fan-out wave by wave; :class:`Gate` is what the
fan-out asks before it starts each host (:mod:`dispatcher.client.fanout`). Standard
library only (``ced run`` imports this module).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from agent.common.records import record

SKIPPED = "skipped"
#: the outcomes that spend the failure budget
SPENDING = frozenset({"failed", "unreachable"})
_SIZE_RE = re.compile(r"^([0-9]{1,9})(%?)$")

Result = dict[str, Any]
T = TypeVar("T")


@record(frozen=True)
class Size:
    """A count of hosts (``N``) or a share of them (``N%``, 1..100)."""

    value: int
    percent: bool = False

    def of(self, total: int) -> int:
        """The number of hosts out of ``total`` (at least 1)."""
        if not self.percent:
            return self.value
        return max(1, -(-self.value * total // 100))

    def __str__(self) -> str:
        return f"{self.value}{'%' if self.percent else ''}"


def parse_size(text: object, what: str) -> Size:
    """``N`` (a whole number >= 1) or ``N%`` (1..100); ValueError naming ``what`` otherwise."""
    raw = str(text).strip() if isinstance(text, (str, int)) and not isinstance(text, bool) else ""
    m = _SIZE_RE.match(raw)
    if m is None:
        raise ValueError(f"{what}: expected a number of hosts N or a share N% (got {text!r})")
    value, percent = int(m.group(1)), m.group(2) == "%"
    if value < 1:
        raise ValueError(f"{what}: must be at least 1 (got {text!r})")
    if percent and value > 100:
        raise ValueError(f"{what}: a share is at most 100% (got {text!r})")
    return Size(value, percent)


@record(frozen=True)
class Rolling:
    """Wave size and failure budget (either may be None: one wave / no budget)."""

    batch: Size | None = None
    max_fail: Size | None = None

    @classmethod
    def parse(
        cls,
        batch: object = None,
        max_fail: object = None,
        fail_fast: bool = False,
        names: tuple[str, str, str] = ("--batch", "--max-fail", "--fail-fast"),
    ) -> Rolling | None:
        """The policy the options ask for (None when none is given); ValueError on a bad
        value, or when ``fail_fast`` meets a different ``max_fail``. ``names`` are the
        options' names in messages (the API's fields: ``batch``, ``max_fail``, ...)."""
        b = parse_size(batch, names[0]) if batch is not None else None
        f = parse_size(max_fail, names[1]) if max_fail is not None else None
        if fail_fast:
            if f is not None and f != Size(1):
                raise ValueError(f"{names[2]} is {names[1]} 1: it cannot go with {names[1]} {f}")
            f = Size(1)
        return None if b is None and f is None else cls(b, f)

    def waves(self, total: int) -> list[int]:
        """The size of each wave for ``total`` hosts (``[total]`` without ``batch``)."""
        if total <= 0:
            return []
        size = total if self.batch is None else min(total, self.batch.of(total))
        full, rest = divmod(total, size)
        return [size] * full + ([rest] if rest else [])

    def budget(self, total: int) -> int | None:
        """How many failed or unreachable hosts stop the run (None: never)."""
        return None if self.max_fail is None else self.max_fail.of(total)

    def describe(self) -> dict[str, Any]:
        return {"batch": str(self.batch) if self.batch else None,
                "max_fail": str(self.max_fail) if self.max_fail else None}  # fmt: skip


class Gate:
    """The failure budget of one run, shared by every wave (fan-out threads call it)."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.spent = 0
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self.budget is not None and self.spent >= self.budget

    def admit(self) -> bool:
        """May one more host start?"""
        with self._lock:
            return not self.closed

    def saw(self, outcome: str) -> None:
        """A host finished with ``outcome``."""
        if outcome in SPENDING:
            with self._lock:
                self.spent += 1

    def reason(self) -> str:
        return (f"not started: --max-fail {self.budget} reached "
                f"({self.spent} failed or unreachable)")  # fmt: skip


OnResult = Callable[[Result, str], None]
#: the fan-out of one wave: its targets, the gate its hosts ask before they start, and the
#: per-host callback it must call as each host finishes
RunWave = Callable[[Sequence[T], Gate, OnResult], Awaitable[list[Result]]]
#: a host never started: its name and why
Skipped = Callable[[str, str], Result]
#: told when a wave starts: its number (from 1), the number of waves, its size
OnWave = Callable[[int, int, int], None]


@record
class Rolled:
    """What :func:`in_waves` came to: results in target order, and how the run rolled."""

    results: list[Result]
    waves: int
    started_waves: int
    skipped: int

    @property
    def stopped(self) -> bool:
        return self.skipped > 0

    def summary(self, policy: Rolling) -> dict[str, Any]:
        """The ``rolling`` object of a run's JSON answer."""
        return {**policy.describe(), "waves": self.waves, "waves_started": self.started_waves,
                "stopped": self.stopped, "skipped": self.skipped}  # fmt: skip


def name_of(t: object) -> str:
    return str(getattr(t, "name", t))


async def in_waves(
    targets: Sequence[T],
    policy: Rolling | None,
    run_wave: RunWave[T],
    skipped: Skipped,
    on_result: OnResult | None = None,
    on_wave: OnWave | None = None,
) -> Rolled:
    """Run ``targets`` wave by wave under ``policy``; results in target order.

    ``run_wave`` fans out one wave (its hosts ask the gate before they start and report
    to the callback it is given, which spends the budget and passes each result on to
    ``on_result``); the hosts of the waves never begun become ``skipped(name, reason)``,
    also passed to ``on_result``. With ``batch``, every result carries its ``wave``.
    """
    sizes = (policy or Rolling()).waves(len(targets))
    gate = Gate(policy.budget(len(targets)) if policy is not None else None)
    batched = policy is not None and policy.batch is not None
    out: list[Result] = []
    start = started = 0

    def tell(n: int) -> OnResult:
        def told(res: Result, outcome: str) -> None:
            if batched:
                res["wave"] = n
            gate.saw(outcome)
            if on_result is not None:
                on_result(res, outcome)

        return told

    for n, size in enumerate(sizes, 1):
        wave = targets[start : start + size]
        start += size
        if gate.closed:
            told = tell(n)
            for t in wave:
                res = skipped(name_of(t), gate.reason())
                told(res, SKIPPED)
                out.append(res)
            continue
        started += 1
        if on_wave is not None:
            on_wave(n, len(sizes), size)
        out.extend(await run_wave(wave, gate, tell(n)))
    skips = sum(1 for r in out if r.get("status") == SKIPPED)
    return Rolled(out, len(sizes), started, skips)
