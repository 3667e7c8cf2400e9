"""Test modules that load the whole machine run alone (``pytest -n``).

A module marked ``pytest.mark.exclusive`` (200 agent processes pairing at once, the
randomized fault runs) makes a 2-core machine's load jump past 100: a timing-sensitive
test of the other worker would then fail for the machine's sake, not the product's, and
those modules are themselves timing-sensitive. So every module holds a shared lock from
its first test's setup to its last test's teardown, and an exclusive module holds it
exclusively; a waiting exclusive module goes first (a turnstile), so the stream of shared
modules does not starve it.

The lock is taken around the test protocol, outside ``pytest-timeout``'s timer: waiting
for the machine is not the test's time. The lock files live in the run's base temp dir,
which the workers of one ``pytest -n`` run share; a run without workers takes no lock.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "exclusive: the module loads the machine; it runs with no other module"
    )


@dataclass
class _Held:
    module: object
    exclusive: bool
    turn: IO[str]
    main: IO[str]

    def release(self) -> None:
        fcntl.flock(self.main, fcntl.LOCK_UN)
        if self.exclusive:
            fcntl.flock(self.turn, fcntl.LOCK_UN)
        self.main.close()
        self.turn.close()


_held: _Held | None = None


def _lock_dir(config: pytest.Config) -> Path | None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    factory: pytest.TempPathFactory = config._tmp_path_factory  # type: ignore[attr-defined]
    return factory.getbasetemp().parent  # pytest-N/, the parent of every popen-gwK/


def _module(item: pytest.Item) -> object:
    return getattr(item, "module", None) or item.nodeid.split("::")[0]


def _acquire(item: pytest.Item, where: Path) -> _Held:
    exclusive = item.get_closest_marker("exclusive") is not None
    t0 = time.monotonic()
    turn = open(where / "turnstile.lock", "a+")  # noqa: SIM115 (held across hook calls)
    main = open(where / "machine.lock", "a+")  # noqa: SIM115
    fcntl.flock(turn, fcntl.LOCK_EX)  # behind any exclusive module already waiting
    try:
        fcntl.flock(main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    finally:
        if not exclusive:
            fcntl.flock(turn, fcntl.LOCK_UN)
    waited = time.monotonic() - t0
    if waited > 1.0:
        print(f"[machine] {item.nodeid.split('::')[0]}: waited "
              f"{waited:.1f} s for {'the machine' if exclusive else 'an exclusive module'}",
              file=sys.stderr)  # fmt: skip
    return _Held(_module(item), exclusive, turn, main)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, None, None]:
    global _held
    where = _lock_dir(item.config)
    if where is not None and (_held is None or _held.module != _module(item)):
        if _held is not None:  # not expected: the last item of a module releases it
            _held.release()
        _held = _acquire(item, where)
    try:
        yield
    finally:
        # the module's fixtures are torn down in its last item's protocol, just ended
        if _held is not None and (nextitem is None or _module(nextitem) != _module(item)):
            _held.release()
            _held = None
