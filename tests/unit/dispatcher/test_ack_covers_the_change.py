"""An acknowledged change is carried by the generation it is acknowledged with.

Regression for issue 8's lost acknowledged approvals: the leader's publisher scans its
files, then publishes (an etcd transaction) and records the generation. An action that
began while that publish was in flight read the generation current before it (N), wrote
its files, and took the in-flight generation N+1, built from a scan that missed its
files, as the one carrying its change: acknowledged with N+1, lost when the leader was
replaced before publishing N+2. A new leader's first publish (right after it opens the
gate) raced the first approval it let in, which is how SIGTERM handovers lost approvals.
The real :class:`Publisher` and :class:`Replication` are used; only etcd is faked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dispatcher.config import DispatcherConfig
from dispatcher.ha.manifest import Generation, Layout, Scanner
from dispatcher.ha.replication import Replication
from dispatcher.ha.sync.publisher import Publisher
from dispatcher.ha.sync.state import AppliedState

EPOCH = 7


class SlowStore:
    """The generation store: the first publish blocks until released (an etcd txn that
    takes a while); every published generation is kept."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.published: list[Generation] = []
        self.last_write: dict[str, int] = {}
        self.last_head = b""
        self.last_new: dict[str, bytes] = {}
        self.last_published: Generation | None = None

    def publish(self, _elector: Any, _epoch: int, g: Generation, _cur: Any, _d: Any) -> int:
        if not self.published and not self.release.is_set():
            self.entered.set()
            assert self.release.wait(10), "the test never released the first publish"
        self.published.append(g)
        self.last_published = g
        return len(self.published)

    def head(self, _raw: bytes, _rev: int = 0) -> None:
        return None


@dataclass
class LeaderRig:
    """A leader's real :class:`Publisher` over a registry holding web1; etcd faked."""

    pub: Publisher
    state: AppliedState
    layout: Layout
    reg: Path
    elector: SimpleNamespace


def leader_rig(
    tmp_path: Path,
    store: Any,
    *,
    get_kv: Callable[[str], Any] = lambda _k: None,
    clock: Callable[[], float] = time.monotonic,
    stop: threading.Event | None = None,
) -> LeaderRig:
    cfg = DispatcherConfig(path=str(tmp_path / "etc" / "ctrl-exec.conf"),
                           ca_dir=str(tmp_path / "etc"), state_dir=str(tmp_path / "state"),
                           registry_dir=str(tmp_path / "agents"), instance_id="m0",
                           sync_mode="push").finish()  # fmt: skip
    reg = Path(cfg.registry_dir)
    reg.mkdir(parents=True)
    (reg / "web1.json").write_text('{"hostname": "web1"}\n')
    layout = Layout(cfg)
    state = AppliedState(cfg.state_dir, "m0", on_record=lambda: None)
    backend = SimpleNamespace(keys=SimpleNamespace(generation="/c/generation"), get_kv=get_kv)
    elector = SimpleNamespace(instance_id="m0", epoch=EPOCH)
    pub = Publisher(
        backend, elector, state, Scanner(layout), SimpleNamespace(mark_ok=lambda: None),  # type: ignore[arg-type]
        lambda *_a, **_k: True, None, store, mode="push", catch_up_limit=1.0,  # type: ignore[arg-type]
        active_operations=lambda: 0, clock=clock, stop=stop or threading.Event(),
    )  # fmt: skip
    return LeaderRig(pub, state, layout, reg, elector)


class Adapter:
    """What :class:`Replication` sees of the syncer (as :class:`Syncer` forwards it)."""

    def __init__(self, pub: Publisher, state: AppliedState) -> None:
        self.pub, self.state = pub, state

    @property
    def generation(self) -> int:
        return self.state.number

    def publish_soon(self) -> None:
        self.pub.publish_soon()

    def ticket(self) -> int:
        return self.pub.ticket()

    def covered(self) -> tuple[int, int]:
        return self.pub.covered()

    def covered_in(self, epoch: int) -> tuple[int, int] | None:
        return self.pub.covered_in(epoch)


def test_an_action_racing_an_inflight_publish_is_acknowledged_with_a_generation_carrying_it(
    tmp_path: Path,
) -> None:
    store = SlowStore()
    stop = threading.Event()
    rig = leader_rig(tmp_path, store, stop=stop)
    pub, state, layout, reg = rig.pub, rig.state, rig.layout, rig.reg
    pub.lead_epoch, pub.caught_up = EPOCH, True  # a leader that has caught up
    rep = Replication("m0", Adapter(pub, state), lambda: [], mode="none", timeout=5.0,
                      covers=layout.covers)  # fmt: skip

    # 1. a publish is in flight: it scanned the files (web1 only) and waits on etcd
    inflight = threading.Thread(target=pub.publish, args=(EPOCH,), kwargs={"force": True})
    inflight.start()
    assert store.entered.wait(5)
    # 2. an approval begins (actions.perform reads the generation first), writes its
    #    registry entry through the fenced writer (which marks the state dirty) and ends
    before = rep.generation
    new = reg / "web9.json"
    new.write_text('{"hostname": "web9"}\n')
    pub.mark_dirty(new)
    rep.note(new)
    # 3. the in-flight publish completes: generation 1, without web9
    store.release.set()
    inflight.join(5)
    assert [g.number for g in store.published] == [1]
    assert "registry/web9.json" not in store.published[0].files

    # 4. the publisher loop keeps running while the action waits for its acknowledgement
    def loop() -> None:
        deadline = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < deadline:
            pub.step(EPOCH)

    looper = threading.Thread(target=loop)
    looper.start()
    try:
        acked = rep.acknowledge(before)
    finally:
        stop.set()
        looper.join(5)
    carrying = [g for g in store.published if g.number == acked]
    assert carrying, f"generation {acked} was never published"
    print(f"acknowledged with generation {acked}; published: "
          f"{[(g.number, sorted(g.files)) for g in store.published]}")  # fmt: skip
    assert "registry/web9.json" in carrying[0].files, (
        f"the change was acknowledged with generation {acked}, which does not carry it"
    )


def test_a_change_whose_epoch_ended_before_it_was_published_is_never_acknowledged(
    tmp_path: Path,
) -> None:
    """The leader wrote its files under epoch 7, then was paused past its lease before
    publishing them; as a follower it applied the new leader's generation (its files
    gone), then led again under epoch 9 and published. That generation's scan began after
    the writes, yet does not carry them: the action must not be acknowledged with it."""
    import pytest

    from dispatcher.ha.replication import NotAcknowledged

    store = SlowStore()
    store.release.set()
    rig = leader_rig(tmp_path, store)
    pub, state, layout, reg, elector = rig.pub, rig.state, rig.layout, rig.reg, rig.elector
    pub.lead_epoch, pub.caught_up = EPOCH, True
    pub.publish(EPOCH, force=True)  # generation 1 under epoch 7
    rep = Replication("m0", Adapter(pub, state), lambda: [], mode="none", timeout=2.0,
                      covers=layout.covers)  # fmt: skip
    before = rep.generation
    new = reg / "web9.json"
    new.write_text('{"hostname": "web9"}\n')  # the action's write under epoch 7
    pub.mark_dirty(new)
    rep.note(new)
    elector.epoch = None  # paused past its lease: it follows
    pub.step_down()
    new.unlink()  # the new leader's generation, applied, does not have it
    elector.epoch = EPOCH + 2  # it leads again, caught up, and publishes
    pub.lead_epoch, pub.caught_up = EPOCH + 2, True
    pub.publish(EPOCH + 2, force=True)
    assert "registry/web9.json" not in store.published[-1].files
    with pytest.raises(NotAcknowledged, match=f"epoch {EPOCH}\\) ended"):
        rep.acknowledge(before, EPOCH)
    # counted without its epoch, the new epoch's generation would have vouched for it
    assert rep.acknowledge(before) == store.published[-1].number
