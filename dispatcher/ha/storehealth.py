"""Whether the coordination store answered lately, shared by every HA component.

The monitor thread probes the store every half second; every other component that sees a
store error reports it here too. Data-plane code (run locks, run records) reads
:attr:`ClusterHealth.ok` to skip the store at once while it is down, so run and ping never
wait for etcd timeouts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class ClusterHealth:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ok = False
        self._error = "not checked yet"
        self._since = clock()

    @property
    def ok(self) -> bool:
        with self._lock:
            return self._ok

    @property
    def error(self) -> str:
        """The last error while unreachable, "" while reachable."""
        with self._lock:
            return "" if self._ok else self._error

    def since(self) -> float:
        """Monotonic time of the last change between reachable and unreachable."""
        with self._lock:
            return self._since

    def mark_ok(self) -> bool:
        """Record a successful call; True when this is a change."""
        with self._lock:
            changed = not self._ok
            if changed:
                self._ok, self._error, self._since = True, "", self._clock()
            return changed

    def mark_failed(self, exc: BaseException | str) -> bool:
        """Record a failed call; True when this is a change."""
        with self._lock:
            changed = self._ok
            self._error = str(exc) or type(exc).__name__
            if changed:
                self._ok, self._since = False, self._clock()
            return changed
