"""``/ready`` means in sync: no timer, the applied record retried until the disk takes it,
the newest epoch kept across restarts, an ex-leader with unpublished files converging."""

from __future__ import annotations

import hashlib
import json
import shutil
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cluster.backend import MemberInfo
from dispatcher.ha.manifest import Entry, Layout, Scanner, file_sha256
from dispatcher.ha.sync import state as state_mod
from dispatcher.ha.sync.fetcher import Fetcher
from dispatcher.ha.sync.state import SyncError
from ops.lab.pki import Issued, TestCA
from ops.lab.proc import wait_until
from tests.unit.dispatcher.test_ha_sync import Rig, generation_of, make_cfg, populate


def publish(rig: Rig, number: int, epoch: int) -> bytes:
    """Publish the leader directory's files as generation ``number`` in the rig's store."""
    head = rig.put(generation_of(rig.leader_cfg, number, epoch))
    rig.backend.put_value(rig.backend.keys.generation, head)
    return head


def in_sync_follower(tmp_path: Path) -> Rig:
    """A follower that read generation 1 (epoch 5) and runs it: ready."""
    rig = Rig(tmp_path)
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca", "agents/web1.json": b"{}"})
    publish(rig, 1, 5)
    rig.syncer.follower.step()
    assert rig.syncer.ready_problem() is None
    return rig


def test_ready_waits_for_the_published_generation_and_never_on_a_timer(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fail_after=0)  # every fetch fails: the leader is unreachable
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca", "agents/web1.json": b"{}"})
    populate(tmp_path / "follower", {"etc/ca.crt": b"diverged"})
    s = rig.syncer
    assert s.ready_problem() == "waiting to read the published generation"
    publish(rig, 1, 5)
    s.follower.step()
    problem = s.ready_problem()
    assert problem is not None and "runs generation 0, the cluster published 1" in problem
    assert "the leader went away" in problem
    view = s.sync_view()
    assert view["state"] == "diverged" and view["published"] == 1 and view["generation"] == 0
    rig.now += 3600  # an hour later, still diverged: still not ready
    s.follower.step()
    assert s.ready_problem() is not None and s.sync_view()["state"] == "diverged"
    rig.fail_after = None  # the leader answers again
    rig.now += 10  # the retry is due
    s.follower.step()
    assert s.ready_problem() is None and s.sync_view()["state"] == "in-sync"
    assert (tmp_path / "follower" / "etc" / "ca.crt").read_bytes() == b"ca"
    # a new generation: behind until applied
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca-2"})
    rig.fail_after = rig.fetched  # fails again
    publish(rig, 2, 5)
    s.follower.step()  # the watch sees the new head ...
    s.follower.step()  # ... which is read and fails to apply
    assert "runs generation 1, the cluster published 2" in (s.ready_problem() or "")


def test_a_failed_applied_record_is_retried_until_the_disk_is_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path)
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca", "agents/web1.json": b"{}"})
    applied = tmp_path / "follower" / "state" / "sync" / "applied.json"
    broken = [True]
    real = state_mod._replace

    def failing(path: Path, text: str) -> None:
        if broken[0] and path == applied:
            raise OSError(30, "Read-only file system")
        real(path, text)

    monkeypatch.setattr(state_mod, "_replace", failing)
    s = rig.syncer
    publish(rig, 1, 5)
    s.follower.step()
    # the files are swapped in: this instance runs generation 1 (memory, member key) ...
    assert (tmp_path / "follower" / "etc" / "ca.crt").read_bytes() == b"ca"
    assert s.generation == 1 and s.ready_problem() is None
    assert s._member_view is not None and s._member_view[0] == 1
    # ... but the record on disk failed, and says so
    assert not applied.exists() and "Read-only" in s.state.write_error
    assert "Read-only" in str(s.sync_view()["record_error"])
    s.start()  # the sync thread retries each tick
    try:
        wait_until(lambda: s.state.unsaved is not None, 2, "a pending record")
        broken[0] = False  # the disk is fixed
        wait_until(applied.exists, 10, "the generation recorded")
    finally:
        s.stop()
    assert json.loads(applied.read_text())["generation"] == 1
    assert s.state.write_error == "" and s.sync_view()["record_error"] is None
    assert rig.make().generation == 1  # a restart trusts the record


def test_a_restarted_follower_refuses_an_older_epoch(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca"})
    assert rig.syncer.follower.handle(rig.put(generation_of(rig.leader_cfg, 1, epoch=9)))
    epoch_file = tmp_path / "follower" / "state" / "sync" / "epoch.json"
    assert json.loads(epoch_file.read_text())["epoch"] == 9
    restarted = rig.make()
    assert restarted.follower.guard.newest == 9 and restarted.leader_guard.newest == 9
    populate(tmp_path / "leader", {"etc/ca.crt": b"forged"})
    stale = generation_of(rig.leader_cfg, 2, epoch=4)
    assert not restarted.follower.handle(rig.put(stale), rev=99)
    assert (tmp_path / "follower" / "etc" / "ca.crt").read_bytes() == b"ca"
    assert restarted.generation == 1
    assert restarted.follower.handle(rig.put(generation_of(rig.leader_cfg, 3, epoch=9)))


def test_an_ex_leader_with_unpublished_files_takes_the_leaders_generation(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    populate(tmp_path / "leader", {"etc/dispatcher.crt": b"old", "etc/dispatcher.key": b"k0",
                                   "agents/web1.json": b"{}"})  # fmt: skip
    # the ex-leader ran generation 1 (its own), then claimed a rotation it never published
    shutil.copytree(tmp_path / "leader" / "etc", tmp_path / "follower" / "etc")
    shutil.copytree(tmp_path / "leader" / "agents", tmp_path / "follower" / "agents")
    assert rig.syncer.follower.handle(rig.put(generation_of(rig.leader_cfg, 1, epoch=3)))
    populate(tmp_path / "follower", {
        "etc/dispatcher.crt": b"new-unpublished", "etc/dispatcher.key": b"k1",
        "etc/dispatcher.crt.prev": b"old", "etc/dispatcher.key.prev": b"k0",
        "state/rotation.json": b'{"current_serial": "new"}',
    })  # fmt: skip
    restarted = rig.make()
    assert restarted.generation == 0  # its files differ from its record: not trusted
    publish(rig, 2, 4)  # the new leader's generation: the old files
    restarted.follower.step()
    assert restarted.ready_problem() is None
    want = {p: e.sha256 for p, e in Scanner(Layout(rig.leader_cfg)).scan().items()}
    got = {p: e.sha256 for p, e in Scanner(Layout(rig.cfg)).scan().items()}
    assert got == want and "ca/dispatcher.crt.prev" not in got and "rotation.json" not in got


# ----- the fetcher presents the kept previous pair when a peer refuses the current one --------


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[TestCA, Issued, Issued, int, list[str]]]:
    ca = TestCA(tmp_path / "pki")
    published = ca.issue("published")
    server = ca.issue("server")
    seen: list[str] = []
    body = b"the published CA file"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            cert = self.connection.getpeercert()  # type: ignore[attr-defined]
            serial = str((cert or {}).get("serialNumber", "")).lower().lstrip("0")
            seen.append(serial)
            ok = serial == published.serial_hex.lstrip("0")
            self.send_response(200 if ok else 403)
            data = body if ok else b"a dispatcher certificate of this cluster is required"
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: object) -> None:
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server.cert, server.key)
    ctx.load_verify_locations(ca.cert_path)
    ctx.verify_mode = ssl.CERT_REQUIRED
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield ca, published, server, httpd.server_address[1], seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)


def test_refused_with_an_unpublished_certificate_the_fetcher_presents_the_kept_one(
    tmp_path: Path, peer: tuple[TestCA, Issued, Issued, int, list[str]]
) -> None:
    ca, published, server, port, seen = peer
    unpublished = ca.issue("unpublished")
    cfg = make_cfg(tmp_path / "exleader", ca=str(ca.cert_path), cert=str(unpublished.cert),
                   key=str(unpublished.key))  # fmt: skip
    body = b"the published CA file"
    e = Entry("ca/ca.crt", 0o644, len(body), hashlib.sha256(body).hexdigest())
    src = [MemberInfo("leader", advertise_url=f"https://127.0.0.1:{port}", generation=2)]
    f = Fetcher(cfg, "exleader", lambda _fresh: src, lambda: {server.serial_hex})
    with pytest.raises(SyncError, match="HTTP 403"):  # no kept pair: refused, nothing else
        f.fetch(src, {}, e, 2)
    assert seen == [unpublished.serial_hex.lstrip("0")]
    shutil.copy(published.cert, f"{unpublished.cert}.prev")
    shutil.copy(published.key, f"{unpublished.key}.prev")
    conns: dict = {}  # type: ignore[type-arg]
    data, who = f.fetch(src, conns, e, 2)
    assert data == body and who == "leader"
    assert seen[-2:] == [unpublished.serial_hex.lstrip("0"), published.serial_hex.lstrip("0")]
    data, _ = f.fetch(src, conns, e, 2)  # the pair that works is kept for this peer
    assert seen[-1] == published.serial_hex.lstrip("0") and len(seen) == 4
    for c in conns.values():
        c.close()
    assert file_sha256(Path(f"{unpublished.cert}.prev")) == file_sha256(published.cert)


def test_a_failed_member_record_update_is_retried_at_the_next_tick(tmp_path: Path) -> None:
    from cluster.errors import BackendUnavailable

    rig = Rig(tmp_path)
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca"})
    s = rig.syncer
    written: list[int] = []
    down = [True]

    def update_member(**changes: object) -> None:
        if down[0]:
            raise BackendUnavailable("etcd went away")
        written.append(int(str(changes["generation"])))

    s.session.update_member = update_member  # type: ignore[method-assign,assignment]
    assert s.follower.handle(rig.put(generation_of(rig.leader_cfg, 1, 5)))
    assert s.generation == 1 and written == [] and not s.health.ok
    s.refresh_member()  # the node's monitor calls this every tick
    assert written == []
    down[0] = False
    s.refresh_member()
    s.refresh_member()  # written once, not at every tick
    assert written == [1]


def test_the_kept_epoch_belongs_to_its_store(tmp_path: Path) -> None:
    """A rebuilt etcd (new cluster id) starts its epochs low again: the kept epoch of the
    old one is forgotten, so the instances rejoin after a disaster recovery."""
    from dispatcher.ha.sync.state import EpochRecord

    old = EpochRecord(str(tmp_path), lambda: "etcd-A")
    old.save(512)
    assert EpochRecord(str(tmp_path), lambda: "etcd-A").saved == 512
    assert EpochRecord(str(tmp_path), None).saved == 512

    def unreachable() -> str:
        raise OSError("etcd down")

    assert EpochRecord(str(tmp_path), unreachable).saved == 512  # cannot tell: keep it
    fresh = EpochRecord(str(tmp_path), lambda: "etcd-B")
    assert fresh.saved == 0
    fresh.save(3)
    assert EpochRecord(str(tmp_path), lambda: "etcd-B").saved == 3


def test_a_follower_applying_the_next_head_stays_ready_briefly_and_only_then(
    tmp_path: Path,
) -> None:
    """An ordinary publish must not take every follower out of the load balancer while it
    applies the new head (HAProxy checks every 500 ms; both live instances caught at once
    left a ping with no server). Only a follower that ran the head before gets the grace,
    only for LAG_GRACE s, and never while an apply fails."""
    rig = Rig(tmp_path)
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca", "agents/web1.json": b"{}"})
    s = rig.syncer
    f = s.follower
    publish(rig, 1, 5)
    f.step()
    assert s.ready_problem() is None and s.generation == 1
    # the watch brings head 2; the apply is under way (the head is read, not yet applied)
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca-2"})
    raw = publish(rig, 2, 5)
    head2 = f.gstore.head(raw, 0)
    assert head2 is not None
    f._note_head(head2)
    assert not f.in_sync() and f.applying()
    assert s.ready_problem() is None  # applying: still ready
    rig.now += f.LAG_GRACE + 0.1  # too long: out until it has applied
    assert "runs generation 1, the cluster published 2" in (s.ready_problem() or "")
    f.step()  # applied
    assert s.ready_problem() is None and s.generation == 2
    # an apply that fails: no grace, at once
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca-3"})
    rig.fail_after = rig.fetched
    publish(rig, 3, 5)
    f.step()
    f.step()
    assert f.last_error and not f.applying()
    assert "runs generation 2, the cluster published 3" in (s.ready_problem() or "")
    # a restarted follower whose first read is a newer head: it never ran it, no grace
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca-4"})
    raw4 = publish(rig, 4, 5)
    restarted = rig.make()
    head4 = restarted.follower.gstore.head(raw4, 0)
    assert head4 is not None
    restarted.follower.read_once = True
    restarted.follower._note_head(head4)
    assert not restarted.follower.applying()
    assert restarted.ready_problem() is not None


def test_a_new_leader_elected_in_sync_stays_ready_while_it_catches_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leader-only work waits while a new leader catches up; run and ping need not: elected
    in sync, it serves as it did a moment before. One that lacks an acknowledged
    generation, or was not in sync, stays out."""
    from cluster.election import Elector

    rig = in_sync_follower(tmp_path)
    s = rig.syncer
    monkeypatch.setattr(Elector, "epoch", property(lambda self: 6))  # elected, epoch 6
    assert "catching up" in (s.publisher.gate_reason() or "")
    assert s.ready_problem() is None  # in sync when elected: serves run and ping
    s.publisher._behind = 9  # it lacks an acknowledged generation: out
    assert "lacks generation 9" in (s.ready_problem() or "")
    s.publisher._behind = 0
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca-2"})
    rig.fail_after = rig.fetched
    monkeypatch.setattr(Elector, "epoch", property(lambda self: None))
    publish(rig, 2, 5)
    s.follower.step()
    s.follower.step()  # behind, its apply failing
    monkeypatch.setattr(Elector, "epoch", property(lambda self: 6))
    assert "catching up" in (s.ready_problem() or "")  # elected out of sync: out


def test_an_ex_leader_is_not_ready_before_it_read_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader cut off from etcd steps down without seeing what a newer leader
    published: it cannot know the head, so ``/ready`` is 503 until it reads the store
    (runbook leader-partition), even if it never read a head as a follower."""
    from cluster.election import Elector
    from cluster.errors import BackendUnavailable

    rig = in_sync_follower(tmp_path)
    s = rig.syncer
    s.publisher.lead_epoch = 5  # it led (the sync thread ran as the leader) ...
    monkeypatch.setattr(Elector, "epoch", property(lambda self: None))  # ... and lost it
    # not ready from that moment, before the sync thread (busy, say, with a call to the
    # etcd it cannot reach) steps down
    assert "no longer the leader" in (s.ready_problem() or "")

    def unreachable(*_a: object) -> int:
        raise BackendUnavailable("etcd: no member answered")

    monkeypatch.setattr(rig.backend, "revision", unreachable)
    with pytest.raises(BackendUnavailable):
        s.tick()
    assert s.ready_problem() == "waiting to read the published generation"
    assert s.sync_view()["state"] == "unknown"
    monkeypatch.undo()
    monkeypatch.setattr(Elector, "epoch", property(lambda self: None))
    s.tick()  # the store answers again: read, in sync
    assert s.ready_problem() is None and s.sync_view()["state"] == "in-sync"
