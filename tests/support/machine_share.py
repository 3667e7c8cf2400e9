"""Test modules that load the whole machine run alone (``pytest -n``).

A module marked ``pytest.mark.exclusive`` (200 agent processes pairing at once, the
randomized fault runs) makes a 2-core machine's load jump past 100: a timing-sensitive
test of the other worker would then fail for the machine's sake, not the product's, and
those modules are themselves timing-sensitive. So every module holds a shared lock for
its whole run (fixtures included) and an exclusive module holds it exclusively; a waiting
exclusive module goes first (a turnstile), so it is not starved by the stream of shared
ones. The lock files live in the run's base temp dir, which the workers of one
``pytest -n`` run share; a run without workers takes no lock.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "exclusive: the module loads the machine; it runs with no other module"
    )


def _lock_dir(factory: pytest.TempPathFactory) -> Path | None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    return factory.getbasetemp().parent  # pytest-N/, the parent of every popen-gwK/


@pytest.fixture(scope="module", autouse=True)
def _machine_share(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:  # fmt: skip
    where = _lock_dir(tmp_path_factory)
    if where is None:
        yield
        return
    exclusive = request.node.get_closest_marker("exclusive") is not None
    t0 = time.monotonic()
    with open(where / "turnstile.lock", "a+") as turn, open(where / "machine.lock", "a+") as main:
        fcntl.flock(turn, fcntl.LOCK_EX)  # behind any exclusive module already waiting
        try:
            fcntl.flock(main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(turn, fcntl.LOCK_UN)
        waited = time.monotonic() - t0
        if waited > 1.0:
            print(f"[machine] {request.node.name}: waited {waited:.1f} s for "
                  f"{'the machine' if exclusive else 'an exclusive module'}",
                  file=sys.stderr)  # fmt: skip
        try:
            yield
        finally:
            fcntl.flock(main, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(turn, fcntl.LOCK_UN)
