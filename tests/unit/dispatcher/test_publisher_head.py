"""The leader publishes over the head it wrote itself without reading it back.

Every acknowledged change publishes a generation; reading the head first (to number the
next generation and name the chunks the store holds) was one etcd round trip on that path.
Within an epoch only this leader writes the head (fenced), so while the store was read less
than ``STORE_CHECK`` s ago and held this leader's head, the next publish builds on the head
it wrote. The store is still read: at the first publish of an epoch, when the check is
due, and after a publish whose transaction failed. The real :class:`Publisher`; etcd and
the generation store are faked.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from cluster.errors import Fenced
from cluster.store import KeyValue
from dispatcher.ha.manifest import Generation
from dispatcher.ha.sync.publisher import Publisher
from tests.unit.dispatcher.test_ack_covers_the_change import EPOCH, leader_rig

KEY = "/c/generation"  # as leader_rig names it


class Store:
    """The generation store and the etcd key it writes: the head written last is what a
    read of the key returns."""

    def __init__(self) -> None:
        self.currents: list[Generation | None] = []  # the head each publish built on
        self.head_kv: KeyValue | None = None
        self.heads: dict[bytes, Generation] = {}
        self.last_write: dict[str, int] = {}
        self.last_head = b""
        self.last_new: dict[str, bytes] = {}
        self.last_published: Generation | None = None
        self.fail_next = False
        self.reads = 0

    def get_kv(self, key: str) -> KeyValue | None:
        assert key == KEY
        self.reads += 1
        return self.head_kv

    def publish(self, _el: Any, _epoch: int, g: Generation, current: Any, _d: Any) -> int:
        self.currents.append(current)
        if self.fail_next:
            self.fail_next = False
            raise Fenced("generation-publish", EPOCH)
        rev = 100 + len(self.currents)
        written = dataclasses.replace(g, chunks=(f"chunk-{g.number}",))
        raw = f"head-{g.number}".encode()
        self.heads[raw] = written
        self.head_kv = KeyValue(KEY, raw, 1, rev)
        self.last_published = written
        return rev

    def head(self, raw: bytes, _rev: int = 0) -> Generation | None:
        return self.heads.get(raw)


@pytest.fixture
def rig(tmp_path: Path) -> tuple[Publisher, Store, list[float], Path]:
    store = Store()
    now = [1000.0]
    leader = leader_rig(tmp_path, store, get_kv=store.get_kv, clock=lambda: now[0])
    return leader.pub, store, now, leader.reg


def _edit(reg: Path, n: int) -> None:
    (reg / f"web{n}.json").write_text(f'{{"hostname": "web{n}"}}\n')


def test_a_publish_builds_on_its_own_head_without_reading_it(
    rig: tuple[Publisher, Store, list[float], Path],
) -> None:
    pub, store, now, reg = rig
    g1 = pub.publish(EPOCH, force=True)
    assert g1 is not None and g1.number == 1 and store.reads == 1
    for n in (2, 3, 4):  # changes in quick succession: no read, each on the previous head
        now[0] += 0.5
        _edit(reg, n)
        g = pub.publish(EPOCH)
        assert g is not None and g.number == n
        before = store.currents[-1]
        assert before is not None and before.number == n - 1
        assert before.chunks == (f"chunk-{n - 1}",)  # the chunks the store holds
    assert store.reads == 1
    # a rewrite with the same bytes (forced) does not read either
    now[0] += 0.5
    assert pub.publish(EPOCH, force=True) is not None and store.reads == 1


def test_the_store_is_read_again_when_its_check_is_due(
    rig: tuple[Publisher, Store, list[float], Path],
) -> None:
    pub, store, now, reg = rig
    assert pub.publish(EPOCH, force=True) is not None
    now[0] += Publisher.STORE_CHECK + 0.1
    _edit(reg, 2)
    assert pub.publish(EPOCH) is not None
    assert store.reads == 2


def test_a_failed_transaction_makes_the_next_publish_read_the_store(
    rig: tuple[Publisher, Store, list[float], Path],
) -> None:
    pub, store, now, reg = rig
    assert pub.publish(EPOCH, force=True) is not None
    store.fail_next = True
    now[0] += 0.5
    _edit(reg, 2)
    with pytest.raises(Fenced):
        pub.publish(EPOCH)
    now[0] += 0.5
    assert pub.publish(EPOCH, force=True) is not None
    assert store.reads == 2  # what the store holds is unknown after a failed transaction


def test_another_epoch_reads_the_store(rig: tuple[Publisher, Store, list[float], Path]) -> None:
    pub, store, now, reg = rig
    assert pub.publish(EPOCH, force=True) is not None
    now[0] += 0.5
    _edit(reg, 2)
    assert pub.publish(EPOCH + 1) is not None  # led again under a new epoch
    assert store.reads == 2
