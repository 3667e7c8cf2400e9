"""Elector deadline logic on the embedded backend, with a clock the test moves."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cluster.backend import LocalBackend
from cluster.election import Elector
from cluster.errors import NotLeader


class Clock:
    """Real monotonic time plus an offset the test can jump forward (a pause, a stall)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return time.monotonic() + self.offset

    def jump(self, seconds: float) -> None:
        with self._lock:
            self.offset += seconds


def wait_for(cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


def test_is_leader_ends_before_the_lease_can_expire(tmp_path: Path) -> None:
    clock = Clock()
    demoted = threading.Event()
    el = Elector(
        LocalBackend(tmp_path), "solo", ttl=30, margin=1.0, clock=clock, on_demoted=demoted.set
    )
    el.start()
    try:
        wait_for(el.is_leader, 5)
        left = el.lease_time_left()
        assert left is not None and 29 < left <= 30
        clock.jump(28.9)  # still more than the margin left
        assert el.is_leader()
        clock.jump(0.2)  # now within the margin: no leader-only work any more
        assert not el.is_leader()
        assert el.epoch is None and el.lease_time_left() is None
        with pytest.raises(NotLeader):
            el.commit("too-late")
        assert not demoted.is_set()  # the thread has not even noticed yet
    finally:
        el.stop()


def test_single_local_instance_always_leads_and_epoch_grows(tmp_path: Path) -> None:
    epochs: list[int] = []
    for _ in range(3):
        backend = LocalBackend(tmp_path)
        el = Elector(backend, "solo", ttl=5).start()
        wait_for(el.is_leader, 5)
        assert el.epoch is not None
        epochs.append(el.epoch)
        el.commit("restart-marker")
        el.stop()
        backend.close()
    assert epochs == sorted(epochs) and len(set(epochs)) == 3


def test_crashed_local_holder_frees_leadership(tmp_path: Path) -> None:
    a = LocalBackend(tmp_path)
    la = a.lease_grant(5)
    assert a.campaign(la.id, "a").won
    a.close()  # as if the process died: the flock on its lease file is gone
    b = LocalBackend(tmp_path)
    lb = b.lease_grant(5)
    res = b.campaign(lb.id, "b")
    assert res.won and res.leader is not None and res.leader.instance_id == "b"
