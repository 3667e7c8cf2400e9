"""The HA layer on the embedded backend: fenced writer, cluster role, run locks, run records.

Two electors on one local state dir elect one leader, as two instances sharing a state
dir do; everything runs in this process with TTL 2 s.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster.backend import LocalBackend
from cluster.election import Elector
from cluster.locks import ClusterRunLocks
from cluster.session import Session
from dispatcher.errors import ClusterUnavailableError, LeaderOnlyRefused, NotLeaderError
from dispatcher.ha.role import ClusterRole
from dispatcher.ha.runlocks import HARunLocks
from dispatcher.ha.runs import ClusterRunStore, metadata
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.ha.writer import FencedWriter
from dispatcher.runlocks import LocalRunLocks, LockConflict
from dispatcher.runstore import async_record

TTL = 2


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def healthy() -> ClusterHealth:
    h = ClusterHealth()
    h.mark_ok()
    return h


class Pair:
    """A leader ``a`` and a follower ``b`` on one local state dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ba = LocalBackend(root / "state")
        self.bb = LocalBackend(root / "state")
        self.a = Elector(self.ba, "a", ttl=TTL).start()
        wait_for(self.a.is_leader)
        self.b = Elector(self.bb, "b", ttl=TTL).start()
        wait_for(lambda: self.b.last_leader is not None)
        self.ha, self.hb = healthy(), healthy()
        self.wa = FencedWriter(self.a, health=self.ha, effect_for=lambda p: "registry-write")
        self.wb = FencedWriter(self.b, health=self.hb, leader_hint=lambda: ("a", "http://a:1"))

    def close(self) -> None:
        for e in (self.a, self.b):
            e.stop(resign=True, timeout=3)
        self.ba.close()
        self.bb.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        p.close()


# ----- FencedWriter -------------------------------------------------------------------------


def test_leader_write_commits_an_effect_then_writes(pair: Pair) -> None:
    target = pair.root / "agents" / "web1.json"
    pair.wa.write(target, '{"hostname": "web1"}\n', 0o640)
    assert target.read_text() == '{"hostname": "web1"}\n'
    assert target.stat().st_mode & 0o777 == 0o640
    effects = pair.ba.effects()
    assert len(effects) == 1
    e = effects[0]
    assert (e.effect, e.epoch, e.instance_id) == ("registry-write", pair.a.epoch, "a")
    assert e.detail["path"] == str(target) and e.detail["op"] == "write"
    assert e.detail["sha256"] == hashlib.sha256(b'{"hostname": "web1"}\n').hexdigest()
    assert pair.wa.delete(target) is True and not target.exists()
    assert [x.detail["op"] for x in pair.ba.effects()] == ["write", "delete"]
    assert pair.wa.delete(target) is False  # nothing to delete: no effect recorded
    assert len(pair.ba.effects()) == 2


def test_operation_commits_every_write_under_its_epoch(pair: Pair) -> None:
    with pair.wa.operation("pairing-approve") as epoch:
        assert epoch == pair.a.epoch
        assert pair.wa.current_operation() == ("pairing-approve", epoch)
        pair.wa.write(pair.root / "x", "1")
        pair.wa.write(pair.root / "y", "2")
    assert pair.wa.current_operation() is None
    assert [(e.effect, e.epoch) for e in pair.ba.effects()] == [("pairing-approve", epoch)] * 2
    assert [e.detail["kind"] for e in pair.ba.effects()] == ["registry-write"] * 2


def test_follower_refuses_and_writes_nothing(pair: Pair) -> None:
    target = pair.root / "rotation.json"
    with pytest.raises(NotLeaderError) as info:
        pair.wb.write(target, "{}")
    msg = str(info.value)
    assert "this instance (b) is not the leader" in msg and "the leader is a at http://a:1" in msg
    assert info.value.leader_id == "a" and info.value.leader_url == "http://a:1"
    assert isinstance(info.value, LeaderOnlyRefused)  # handlers of refused changes cope
    with pytest.raises(NotLeaderError):
        pair.wb.delete(target)  # refused even when there is nothing to delete
    with pytest.raises(NotLeaderError), pair.wb.operation("pairing-approve"):
        pass
    assert not target.exists() and pair.ba.effects() == []


def test_follower_with_store_down_says_cluster_unavailable(pair: Pair) -> None:
    pair.hb.mark_failed("connection refused")
    with pytest.raises(ClusterUnavailableError, match=r"cluster unavailable.*connection refused"):
        pair.wb.write(pair.root / "x", "1")


def test_operation_stops_when_leadership_ends_midway(pair: Pair) -> None:
    first, second = pair.root / "first", pair.root / "second"
    with pytest.raises(NotLeaderError, match="epoch"), pair.wa.operation("rotate") as epoch:
        pair.wa.write(first, "1")
        pair.a.resign(hold_off=30)  # b takes over; a's epoch is over
        wait_for(pair.b.is_leader)
        pair.wa.write(second, "2")
    assert first.exists() and not second.exists()
    assert [(e.effect, e.epoch) for e in pair.ba.effects()] == [("rotate", epoch)]
    # the new leader writes under its own, newer epoch
    pair.wb.write(second, "2")
    assert pair.b.epoch is not None and pair.b.epoch > epoch
    assert [e.epoch for e in pair.ba.effects()] == [epoch, pair.b.epoch]


def test_stale_epoch_commit_is_fenced_in_the_store(pair: Pair) -> None:
    """A writer whose elector still believes it leads (paused process) is refused by the
    store's compare on the leader key's create revision."""
    old = pair.a.epoch
    assert old is not None
    pair.ba.resign(pair.a._lease.id if pair.a._lease else 0)  # the lease vanished under it
    wait_for(pair.b.is_leader)
    assert pair.ba.record_effect(old, "late", "a") is None
    with pytest.raises(NotLeaderError):
        pair.wa.write(pair.root / "late", "x")  # epoch check or store fence, never a write
    assert not (pair.root / "late").exists()


def test_batch_commits_every_write_in_one_transaction_then_writes(pair: Pair) -> None:
    old = pair.root / "old"
    pair.wa.write(old, "0")
    before = len(pair.ba.effects())
    x, y = pair.root / "x", pair.root / "y"
    with pair.wa.operation("pairing-approve") as epoch, pair.wa.batch():
        pair.wa.write(x, "1")
        pair.wa.write(y, "2")
        assert pair.wa.delete(old) is True
        assert pair.wa.delete(pair.root / "absent") is False  # nothing staged for it
        assert pair.wa.delete(x) is True  # staged write, then its delete: exists logically
        pair.wa.write(x, "3")
        with pair.wa.batch():  # nested: joins the outer one
            pair.wa.write(pair.root / "z", "4")
        # staged only: nothing on disk, nothing in the store yet
        assert not x.exists() and not y.exists() and old.exists()
        assert len(pair.ba.effects()) == before
    new = pair.ba.effects()[before:]
    assert len({e.revision for e in new}) == 1  # one transaction
    assert [(e.detail["op"], Path(e.detail["path"]).name) for e in new] == [
        ("write", "x"), ("write", "y"), ("delete", "old"), ("delete", "x"), ("write", "x"),
        ("write", "z")]  # fmt: skip
    assert {(e.effect, e.epoch, e.instance_id) for e in new} == {("pairing-approve", epoch, "a")}
    assert x.read_text() == "3" and y.read_text() == "2" and not old.exists()
    assert (pair.root / "z").read_text() == "4"


def test_batch_that_raises_commits_and_writes_nothing(pair: Pair) -> None:
    target = pair.root / "never"
    with pytest.raises(RuntimeError, match="action failed"), pair.wa.batch():
        pair.wa.write(target, "1")
        raise RuntimeError("action failed")
    assert not target.exists() and pair.ba.effects() == []


def test_batch_of_a_follower_is_refused_at_the_first_write(pair: Pair) -> None:
    with pytest.raises(NotLeaderError), pair.wb.batch():
        pair.wb.write(pair.root / "x", "1")
    assert not (pair.root / "x").exists() and pair.ba.effects() == []


class _Paused(Elector):
    """An ex-leader that still believes it leads under its old epoch (a paused process
    resumed before its elector thread noticed): only the store's compare can stop it."""

    stale: int = 0

    @property
    def epoch(self) -> int | None:
        return self.stale


def test_batch_of_a_paused_ex_leader_is_fenced_as_a_whole(pair: Pair) -> None:
    old = pair.a.epoch
    assert old is not None
    pair.ba.resign(pair.a._lease.id if pair.a._lease else 0)  # the lease vanished under it
    wait_for(pair.b.is_leader)
    assert pair.ba.record_effects(old, "a", [("late", {}), ("late", {})]) is None
    pair.a.__class__ = _Paused
    pair.a.stale = old  # type: ignore[attr-defined]
    first, second = pair.root / "first", pair.root / "second"
    with pytest.raises(NotLeaderError, match="fenced"), pair.wa.operation(
        "pairing-approve", verify=False
    ), pair.wa.batch():  # fmt: skip
        pair.wa.write(first, "1")
        pair.wa.write(second, "2")
    assert not first.exists() and not second.exists()
    assert pair.ba.effects() == []


def test_batch_of_many_writes_commits_in_several_transactions(pair: Pair) -> None:
    pair.wa.BATCH_MAX = 3
    with pair.wa.batch():
        for i in range(7):
            pair.wa.write(pair.root / f"f{i}", str(i))
    effects = pair.ba.effects()
    assert [Path(e.detail["path"]).name for e in effects] == [f"f{i}" for i in range(7)]
    assert len({e.revision for e in effects}) == 3
    assert all((pair.root / f"f{i}").read_text() == str(i) for i in range(7))


def test_prune_keeps_the_newest_effects(pair: Pair) -> None:
    for i in range(7):
        pair.wa.write(pair.root / f"f{i}", str(i))
    epoch = pair.a.epoch
    assert epoch is not None
    assert pair.wa.prune(epoch, keep=3) == 4
    kept = [e for e in pair.ba.effects() if e.effect == "registry-write"]
    assert [e.detail["path"] for e in kept] == [str(pair.root / f"f{i}") for i in (4, 5, 6)]


# ----- ClusterRole --------------------------------------------------------------------------


def test_role_of_leader_and_follower(pair: Pair) -> None:
    resigned: list[bool] = []
    ra = ClusterRole(pair.a, backend_kind="local", health=pair.ha, generation=lambda: 3)
    rb = ClusterRole(pair.b, backend_kind="local", health=pair.hb,
                     on_resign=lambda: resigned.append(True))  # fmt: skip
    sa = ra.snapshot()
    assert (sa.instance_id, sa.role, sa.leader_id, sa.epoch) == ("a", "leader", "a", pair.a.epoch)
    assert sa.lease_ttl == TTL and sa.lease_time_left is not None
    assert 0 < sa.lease_time_left <= TTL
    assert (sa.generation, sa.etcd, sa.backend) == (3, "ok", "local")
    assert sa.leader_since is not None and time.time() - 60 < sa.leader_since <= time.time()
    rb.observe(pair.bb.leader())
    sb = rb.snapshot()
    assert (sb.role, sb.leader_id, sb.epoch) == ("follower", "a", pair.a.epoch)
    assert sb.lease_ttl is None and sb.lease_time_left is None and sb.leader_since is None
    # store unreachable: a follower cannot tell; it keeps the epoch it saw
    pair.hb.mark_failed("timeout")
    sb = rb.snapshot()
    assert (sb.role, sb.leader_id, sb.epoch, sb.etcd) == ("unknown", None, pair.a.epoch,
                                                           "unreachable")  # fmt: skip
    rb.resign()
    assert resigned == [True]


def test_role_counts_leadership_changes(pair: Pair) -> None:
    rb = ClusterRole(pair.b, backend_kind="local", health=pair.hb)
    rb.observe(pair.bb.leader())
    assert rb.leader_changes == 0
    pair.a.resign(hold_off=30)
    wait_for(pair.b.is_leader)
    snap = rb.snapshot()
    assert (snap.role, snap.leader_id, snap.epoch) == ("leader", "b", pair.b.epoch)
    assert rb.leader_changes == 1
    assert rb.guard.newest == pair.b.epoch


# ----- run locks and run records --------------------------------------------------------------


def test_run_locks_are_cluster_wide_and_fall_back_to_local(tmp_path: Path) -> None:
    backends = [LocalBackend(tmp_path / "state") for _ in range(2)]
    sessions = [Session(b, ttl=TTL).start() for b in backends]
    healths = [healthy(), healthy()]
    locks = [
        HARunLocks(ClusterRunLocks(b, s, owner=f"i{n}"), LocalRunLocks(tmp_path / f"locks{n}"), h)
        for n, (b, s, h) in enumerate(zip(backends, sessions, healths, strict=True))
    ]
    try:
        wait_for(lambda: all(s.current_lease_id() is not None for s in sessions))
        held = locks[0].acquire_all([("web1", "deploy"), ("web2", "deploy")])
        assert held.cluster_wide
        with pytest.raises(LockConflict) as info:
            locks[1].acquire_all([("web2", "deploy"), ("web3", "deploy")])
        assert info.value.conflicts == ["web2:deploy"]
        assert locks[1].list_held() == [("web1", "deploy"), ("web2", "deploy")]
        # the store down on instance 1: runs go on with its local locks alone
        healths[1].mark_failed("connection refused")
        with locks[1].acquire_all([("web2", "deploy")]) as local_only:
            assert not local_only.cluster_wide
        held.release()
        healths[1].mark_ok()
        with locks[1].acquire_all([("web2", "deploy")]) as again:
            assert again.cluster_wide
        assert locks[0].list_held() == []
    finally:
        for s in sessions:
            s.close()


def test_async_run_metadata_is_shared_without_output(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "state")
    a = ClusterRunStore(tmp_path / "runs-a", backend, healthy())
    b = ClusterRunStore(tmp_path / "runs-b", backend, healthy())
    rec = async_record("00aa11bb22cc33dd", "deploy",
                       [{"host": "web1", "status": "accepted"},
                        {"host": "web2", "status": "error", "error": "refused"}],
                       {"username": "ops", "source_ip": "10.0.0.9"})  # fmt: skip
    a.save(rec)
    got = b.load("00aa11bb22cc33dd")
    assert got == metadata(rec)
    assert got["hosts"] == {"web1": {"status": "accepted"},
                            "web2": {"status": "error", "error": "refused"}}  # fmt: skip
    assert got["submitter"] == {"username": "ops", "source_ip": "10.0.0.9"}
    done = dict(got, hosts={"web1": {"status": "done", "exit": 0, "stdout": "secret", "stderr": ""},
                            "web2": got["hosts"]["web2"]})  # fmt: skip
    b.save(done)  # aggregated on b: stays local, never republished with output
    raw = backend.get_value(backend.keys.run("00aa11bb22cc33dd"))
    assert raw is not None and b"secret" not in raw
    assert b.load("00aa11bb22cc33dd") == done  # the local file answers first
    assert b.load("ffffffffffffffff") is None
