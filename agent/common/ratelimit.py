"""Per-source-IP connection limits (spec 10.2): volume and TLS-failure probe.

Blocked connections are closed without a response. At most ``max_ips`` addresses are
tracked; when full, the entry whose block ends first is evicted (``rate-evict``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RateSpec:
    """``limit`` connections per ``window`` seconds, else blocked for ``block`` seconds."""

    limit: int
    window: int
    block: int


@dataclass
class _Entry:
    conns: deque[float] = field(default_factory=deque)
    fails: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0


class RateLimiter:
    def __init__(
        self,
        volume: RateSpec,
        probe: RateSpec,
        disabled: bool = False,
        max_ips: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, str, str], None] | None = None,
    ):
        self.volume = volume
        self.probe = probe
        self.disabled = disabled
        self.max_ips = max_ips
        self.clock = clock
        self.on_event = on_event or (lambda action, ip, reason: None)
        self._ips: dict[str, _Entry] = {}

    def clear(self) -> None:
        self._ips.clear()

    def _entry(self, ip: str) -> _Entry:
        e = self._ips.get(ip)
        if e is None:
            if len(self._ips) >= self.max_ips:
                victim = min(self._ips, key=lambda k: self._ips[k].blocked_until)
                del self._ips[victim]
                self.on_event("rate-evict", victim, "capacity")
            e = self._ips[ip] = _Entry()
        return e

    def blocked(self, ip: str) -> bool:
        """True while ``ip`` serves a block. An expired block clears the whole entry."""
        if self.disabled:
            return False
        e = self._ips.get(ip)
        if e is None or not e.blocked_until:
            return False
        if self.clock() < e.blocked_until:
            return True
        del self._ips[ip]
        return False

    @staticmethod
    def _hit(times: deque[float], now: float, spec: RateSpec) -> bool:
        while times and times[0] <= now - spec.window:
            times.popleft()
        over = len(times) >= spec.limit
        times.append(now)
        return over

    def record_connection(self, ip: str) -> bool:
        """Count a connection; returns True if it must be refused (and starts a block)."""
        if self.disabled or self.volume.limit == 0:
            return False
        now = self.clock()
        e = self._entry(ip)
        if self._hit(e.conns, now, self.volume):
            e.blocked_until = now + self.volume.block
            self.on_event("rate-block", ip, "volume")
            return True
        return False

    def record_failure(self, ip: str) -> None:
        """Count a failed TLS handshake; enough of them start a probe block."""
        if self.disabled or self.probe.limit == 0:
            return
        now = self.clock()
        e = self._entry(ip)
        if self._hit(e.fails, now, self.probe) or len(e.fails) >= self.probe.limit:
            e.blocked_until = now + self.probe.block
            self.on_event("rate-block", ip, "probe")
