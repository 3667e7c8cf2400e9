"""pytest glue for a real HAProxy: the launcher lives in :mod:`ops.lab.haproxy`.

``haproxy_factory`` starts as many HAProxy processes as a test asks for, under its
``tmp_path``, and stops each one by PID at teardown::

    def test_x(haproxy_factory, tmp_path):
        hap = haproxy_factory([Member("i1", "127.0.0.1", api, health, pairing, proxy)],
                              proxy_protocol=True)
        hap.wait_status(API_BACKEND, {"i1": "UP"})
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dispatcher.haproxy import Member
from ops.lab.haproxy import HAPROXY, SKIP_REASON, HAProxy

__all__ = ["Factory", "haproxy_factory", "needs_haproxy"]

needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason=SKIP_REASON)

Factory = Callable[..., HAProxy]


@pytest.fixture
def haproxy_factory(tmp_path: Path) -> Iterator[Factory]:
    started: list[HAProxy] = []

    def make(members: list[Member], **kw: object) -> HAProxy:
        hap = HAProxy(tmp_path / f"haproxy{len(started) + 1}", members, **kw)  # type: ignore[arg-type]
        started.append(hap)
        return hap.start()

    try:
        yield make
    finally:
        for hap in started:
            hap.stop()
