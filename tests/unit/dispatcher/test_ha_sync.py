"""Generations without a cluster: manifests, applying one (and crashing midway), refusals."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from cluster.backend import LocalBackend, MemberInfo
from cluster.election import Elector, EpochGuard
from cluster.session import Session
from cluster.signing import RecordSigner, write_key
from dispatcher.config import DispatcherConfig
from dispatcher.ha.manifest import (
    STAGE_DIR,
    Entry,
    Generation,
    Layout,
    ManifestError,
    Scanner,
    check_logical,
    manifest_hash,
)
from dispatcher.ha.records import ORDER, Records
from dispatcher.ha.restart import OrderWatcher
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.ha.sync import Syncer, SyncError
from dispatcher.pki import ca as pki

KEY = b"K" * 32


def make_cfg(root: Path, **kw: Any) -> DispatcherConfig:
    cfg = DispatcherConfig(path=str(root / "etc" / "ctrl-exec.conf"), ca_dir=str(root / "etc"),
                           state_dir=str(root / "state"), registry_dir=str(root / "agents"),
                           instance_id=root.name, sync_mode="push")  # fmt: skip
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg.finish()


def populate(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def generation_of(cfg: DispatcherConfig, number: int = 1, epoch: int = 5) -> Generation:
    files = Scanner(Layout(cfg)).scan()
    return Generation(number, epoch, "leader", manifest_hash(files), files, 1.0)


# ----- manifests -----------------------------------------------------------------------------


def test_layout_maps_logical_paths_and_skips_what_is_not_shared(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    populate(tmp_path, {
        "etc/ca.crt": b"ca", "etc/ca.key": b"secret", "etc/sub/hook": b"#!/bin/sh\n",
        "etc/ctrl-exec.conf": b"instance_id = x\n", "etc/.tmp.part": b"half",
        "agents/web1.json": b"{}", "agents/.registry.lock": b"", "state/rotation.json": b"{}",
        "state/runs/r.json": b"{}",
    })  # fmt: skip
    (tmp_path / "etc" / "sub" / "hook").chmod(0o755)
    got = Scanner(Layout(cfg)).scan()
    assert sorted(got) == ["ca/ca.crt", "ca/ca.key", "ca/sub/hook", "registry/web1.json",
                           "rotation.json"]  # fmt: skip
    assert got["ca/sub/hook"].mode == 0o755 and got["ca/ca.key"].size == 6
    layout = Layout(cfg)
    assert layout.local("ca/sub/hook") == tmp_path / "etc" / "sub" / "hook"
    assert layout.local("rotation.json") == tmp_path / "state" / "rotation.json"
    with pytest.raises(ManifestError):
        layout.local("ca/ctrl-exec.conf")  # the instance's own config is never synced
    with pytest.raises(ManifestError):
        layout.local("pki/cert")  # the cert lives in ca_dir here


def test_cert_outside_ca_dir_is_a_pki_path(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path, cert=str(tmp_path / "tls" / "d.crt"), key=str(tmp_path / "tls" / "d.key")
    )
    populate(tmp_path, {"tls/d.crt": b"c", "tls/d.key": b"k", "tls/d.crt.prev": b"p"})
    got = Scanner(Layout(cfg)).scan()
    assert {"pki/cert", "pki/key", "pki/cert.prev"} <= set(got)


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "ca/../x", "ca/.hidden", "ca", "x/y",
                                 "registry/a/./b", "ca//x", "ca/a\\b"])  # fmt: skip
def test_bad_logical_paths(bad: str) -> None:
    with pytest.raises(ManifestError):
        check_logical(bad)


def test_generation_document_round_trip_and_tampering(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    populate(tmp_path, {"etc/ca.crt": b"ca", "agents/a.json": b"{}"})
    g = generation_of(cfg, 7, 3)
    back = Generation.from_json(g.to_json())
    assert (back.number, back.epoch, back.files) == (7, 3, g.files)
    doc = json.loads(g.to_json())
    doc["files"][0]["sha256"] = "0" * 64  # a file swapped, the hash left as it was
    with pytest.raises(ManifestError, match="does not match"):
        Generation.from_json(json.dumps(doc))
    doc = json.loads(g.to_json())
    doc["files"].append({"path": "ca/../../x", "mode": 420, "size": 1, "sha256": "0" * 64})
    with pytest.raises(ManifestError):
        Generation.from_json(json.dumps(doc))
    assert "secret" not in g.to_json()


# ----- applying a generation -------------------------------------------------------------------


class Rig:
    """A follower :class:`Syncer` whose "leader" is a directory on the same machine."""

    def __init__(self, tmp: Path, fail_after: int | None = None,
                 records: Records | None = None) -> None:  # fmt: skip
        self.now = 1000.0  # the syncer's clock (tests move it)
        self.leader_cfg = make_cfg(tmp / "leader")
        self.cfg = make_cfg(tmp / "follower")
        self.backend = LocalBackend(tmp / "store")
        self.fail_after = fail_after
        self.fetched = 0
        self.records = records or Records(RecordSigner(b"k" * 32), "follower")
        self.leader_records = self.records if records is None else Records(RecordSigner(KEY))
        self.syncer = self.make()

    def sealed(self, g: Generation) -> bytes:
        """``g`` as the leader publishes it: its chunks stored, the head sealed with the
        cluster key (returned)."""
        head, chunks = self.leader_records.seal_generation(self.backend.keys.generation, g)
        for sha, data in chunks.items():
            self.backend.put_value(self.backend.keys.generation_chunk(sha), data)
        return head.encode()

    def order(self, doc: dict[str, Any]) -> None:
        key = self.backend.keys.order("follower")
        self.backend.put_value(key, self.leader_records.seal(ORDER, key, doc))

    def make(self) -> Syncer:
        elector = Elector(self.backend, "follower", ttl=5)
        session = Session(self.backend, ttl=5, member=MemberInfo("follower"))
        guard = EpochGuard()
        health = ClusterHealth()
        health.mark_ok()
        leader = MemberInfo("leader", advertise_url="https://127.0.0.1:1", generation=1)
        s = Syncer(self.cfg, self.backend, elector, session, guard, health,
                   lambda _fresh: [leader], self.records, clock=lambda: self.now)  # fmt: skip
        leader_layout = Layout(self.leader_cfg)

        def fetch(sources: Any, conns: Any, e: Entry, number: int) -> tuple[bytes, str]:
            if self.fail_after is not None and self.fetched >= self.fail_after:
                raise SyncError("the leader went away")
            self.fetched += 1
            return leader_layout.local(e.path).read_bytes(), "leader"

        s.fetcher.fetch = fetch  # type: ignore[method-assign]
        return s

    put = sealed


def test_apply_fetches_swaps_removes_and_records(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    populate(tmp_path / "leader", {
        "etc/ca.crt": b"ca-new", "etc/ca.key": b"key", "etc/bundle/a": b"A",
        "agents/web1.json": b'{"n":1}', "state/rotation.json": b"{}",
    })  # fmt: skip
    (tmp_path / "leader" / "etc" / "ca.key").chmod(0o600)
    populate(tmp_path / "follower", {
        "etc/ca.crt": b"ca-old", "etc/ca.key": b"key", "etc/old/gone": b"x",
        "agents/web1.json": b'{"n":1}', "agents/web9.json": b"{}",
    })  # fmt: skip
    g = generation_of(rig.leader_cfg)
    assert rig.syncer.follower.handle(rig.sealed(g))
    f = tmp_path / "follower"
    assert (f / "etc" / "ca.crt").read_bytes() == b"ca-new"
    assert (f / "etc" / "bundle" / "a").read_bytes() == b"A"
    assert not (f / "agents" / "web9.json").exists() and not (f / "etc" / "old").exists()
    assert os.stat(f / "etc" / "ca.key").st_mode & 0o777 == 0o600
    assert rig.fetched == 3  # ca.crt, bundle/a, rotation.json: equal files are not fetched
    assert rig.syncer.generation == 1
    assert json.loads((f / "state" / "sync" / "applied.json").read_text())["generation"] == 1
    assert not list(rig.syncer.layout.stage_dirs())
    # a restarted follower trusts its record only while the files still match it
    assert rig.make().generation == 1
    (f / "etc" / "ca.crt").write_bytes(b"edited by hand")
    assert rig.make().generation == 0


def test_a_crash_while_staging_leaves_no_partial_file(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fail_after=2)
    rig.syncer.fetcher.WORKERS = 1  # one lane: the files are fetched in order
    populate(tmp_path / "leader", {f"etc/f{i}": f"new-{i}".encode() for i in range(5)})
    populate(tmp_path / "follower", {f"etc/f{i}": f"old-{i}".encode() for i in range(5)})
    g = generation_of(rig.leader_cfg)
    assert not rig.syncer.follower.handle(rig.sealed(g))  # fetch 3 fails: retried later
    f = tmp_path / "follower" / "etc"
    assert [(f / f"f{i}").read_bytes() for i in range(5)] == [f"old-{i}".encode()
                                                              for i in range(5)]  # fmt: skip
    assert rig.syncer.generation == 0 and rig.syncer.follower.retry_at is not None
    # as if killed here: two files staged next to their targets
    stage = f / ".ctrl-exec-sync"
    assert sorted(os.listdir(stage)) == ["f0", "f1"]
    fresh = rig.make()  # a restart removes the leftovers, then converges
    assert not stage.exists()
    rig.fail_after = None
    assert fresh.follower.handle(rig.sealed(g))
    assert [(f / f"f{i}").read_bytes() for i in range(5)] == [f"new-{i}".encode()
                                                              for i in range(5)]  # fmt: skip


def test_changed_files_are_fetched_at_once_each_lane_on_its_own_connections(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    populate(tmp_path / "leader", {"agents/web1.json": b'{"n":2}', "etc/approved/x.json": b"{}"})
    populate(tmp_path / "follower", {"agents/web1.json": b'{"n":1}'})
    both = threading.Barrier(2, timeout=5)  # sequential fetches never meet: BrokenBarrierError
    lanes: list[int] = []
    fetch = rig.syncer.fetcher.fetch

    def meeting(sources: Any, conns: Any, e: Entry, number: int) -> tuple[bytes, str]:
        lanes.append(id(conns))
        both.wait()
        return fetch(sources, conns, e, number)

    rig.syncer.fetcher.fetch = meeting  # type: ignore[method-assign]
    assert rig.syncer.follower.handle(rig.sealed(generation_of(rig.leader_cfg)))
    f = tmp_path / "follower"
    assert (f / "agents" / "web1.json").read_bytes() == b'{"n":2}'
    assert (f / "etc" / "approved" / "x.json").read_bytes() == b"{}"
    assert len(set(lanes)) == 2  # two connection sets: no two threads on one connection
    assert rig.syncer.fetcher.lane(0) is rig.syncer.fetcher.conns
    assert not list(rig.syncer.layout.stage_dirs())


def test_a_lane_that_fails_stops_the_apply_and_members_are_read_again_once(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    populate(tmp_path / "leader", {f"etc/f{i}": f"new-{i}".encode() for i in range(6)})
    populate(tmp_path / "follower", {f"etc/f{i}": f"old-{i}".encode() for i in range(6)})
    fresh_reads: list[bool] = []
    sources = rig.syncer.fetcher.sources
    fetch = rig.syncer.fetcher.fetch

    def counted(g: Generation, fresh: bool = False) -> list[MemberInfo]:
        fresh_reads.append(fresh)
        return sources(g, fresh)

    def failing(src: Any, conns: Any, e: Entry, number: int) -> tuple[bytes, str]:
        if e.path == "ca/f3":
            raise SyncError("the leader went away")
        return fetch(src, conns, e, number)

    rig.syncer.fetcher.sources = counted  # type: ignore[method-assign]
    rig.syncer.fetcher.fetch = failing  # type: ignore[method-assign, assignment]
    assert not rig.syncer.follower.handle(rig.sealed(generation_of(rig.leader_cfg)))
    f = tmp_path / "follower" / "etc"
    assert [(f / f"f{i}").read_bytes() for i in range(6)] == [f"old-{i}".encode()
                                                              for i in range(6)]  # fmt: skip
    assert fresh_reads.count(True) == 1  # one fresh read of the members, not one per lane
    assert rig.syncer.generation == 0 and rig.syncer.follower.retry_at is not None


def test_generation_from_an_older_epoch_is_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca"})
    assert rig.syncer.follower.handle(rig.sealed(generation_of(rig.leader_cfg, 1, epoch=9)))
    populate(tmp_path / "leader", {"etc/ca.crt": b"forged"})
    stale = generation_of(rig.leader_cfg, 2, epoch=4)
    assert not rig.syncer.follower.handle(rig.sealed(stale), rev=77)
    assert (tmp_path / "follower" / "etc" / "ca.crt").read_bytes() == b"ca"
    assert rig.syncer.generation == 1
    rig.syncer.leader_guard.check(12)  # a newer leader was seen: its epoch counts too
    newer = generation_of(rig.leader_cfg, 3, epoch=10)
    assert not rig.syncer.follower.handle(rig.sealed(newer), rev=78)
    assert rig.syncer.follower.handle(rig.sealed(generation_of(rig.leader_cfg, 4, epoch=12)))


def test_restart_order_from_an_older_epoch_is_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    guard = EpochGuard(10)
    restarts: list[str] = []
    watcher = OrderWatcher(rig.backend, "follower", guard, rig.syncer, lambda: False)
    watcher.on_restart = restarts.append
    key = rig.backend.keys.order("follower")
    rig.order({"id": "o1", "epoch": 3, "generation": 0})
    watcher.check()
    assert restarts == [] and rig.backend.get_value(key) is None
    # current epoch, but nothing changed on disk since this process loaded it: nothing to do
    rig.order({"id": "o2", "epoch": 10, "generation": 0})
    watcher.check()
    assert restarts == []
    populate(tmp_path / "follower", {"etc/dispatcher.crt": b"rotated"})
    rig.order({"id": "o3", "epoch": 11, "generation": 0})
    watcher.check()
    watcher.check()  # an order is carried out once
    assert len(restarts) == 1 and "epoch 11" in restarts[0]


def test_unsealed_or_forged_records_are_ignored_and_never_move_the_epoch(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca"})
    assert rig.syncer.follower.handle(rig.sealed(generation_of(rig.leader_cfg, 1, epoch=9)))
    populate(tmp_path / "leader", {"etc/ca.crt": b"forged"})
    huge = generation_of(rig.leader_cfg, 2, epoch=10**12)
    key = rig.backend.keys.generation
    forger = Records(RecordSigner(b"x" * 32))  # a key that is not the cluster's
    for n, raw in enumerate([huge.to_json().encode(),  # unsigned
                             forger.seal_generation(key, huge)[0].encode(),  # wrong key
                             rig.records.seal_generation("/other/key", huge)[0].encode(),  # moved
                             b"{not json", b"[]"]):  # fmt: skip
        assert not rig.syncer.follower.handle(raw, rev=100 + n)
    assert (tmp_path / "follower" / "etc" / "ca.crt").read_bytes() == b"ca"
    assert rig.syncer.follower.guard.newest == 9  # the forged epoch moved nothing
    assert rig.records.rejections.counts() == {"generation": 5}
    populate(tmp_path / "leader", {"etc/ca.crt": b"genuine"})
    assert rig.syncer.follower.handle(rig.sealed(generation_of(rig.leader_cfg, 3, epoch=10)))
    assert (tmp_path / "follower" / "etc" / "ca.crt").read_bytes() == b"genuine"
    # a forged restart order is deleted, never acted on
    restarts: list[str] = []
    watcher = OrderWatcher(rig.backend, "follower", EpochGuard(10), rig.syncer, lambda: False)
    watcher.on_restart = restarts.append
    populate(tmp_path / "follower", {"etc/dispatcher.crt": b"rotated"})  # a restart is due
    okey = rig.backend.keys.order("follower")
    rig.backend.put_value(okey, json.dumps({"id": "o9", "epoch": 11, "generation": 0}))
    watcher.check()
    assert restarts == [] and rig.backend.get_value(okey) is None
    assert rig.records.rejections.counts()["order"] == 1


# ----- only the leader signs -------------------------------------------------------------------


def test_sign_guard_refuses_before_any_signature(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path / "ca")
    seen: list[str] = []

    def guard(what: str) -> None:
        seen.append(what)
        raise pki.PKIError("only the leader signs")

    pki.set_sign_guard(guard)
    try:
        with pytest.raises(pki.PKIError, match="only the leader"):
            pki.issue_dispatcher_cert(ca, tmp_path / "d.crt", tmp_path / "d.key")
    finally:
        pki.set_sign_guard(None)
    assert seen == ["certificate for CN=ctrl-exec-dispatcher"]
    assert not (tmp_path / "d.crt").exists()
    pki.issue_dispatcher_cert(ca, tmp_path / "d.crt", tmp_path / "d.key")


def test_a_follower_leaves_renewals_to_the_leader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from dispatcher.core import Dispatcher
    from dispatcher.pki import renewal

    calls: list[str] = []

    async def renew(d: Any, target: Any, **kw: Any) -> dict[str, Any]:
        calls.append(target.name)
        return {"host": target.name, "status": "ok", "expiry": "later"}

    monkeypatch.setattr(renewal, "renew", renew)
    d = Dispatcher(make_cfg(tmp_path))

    class Target:
        name, address, port = "web1", "127.0.0.1", 1

    ping = {"status": "ok", "expiry": "Jan  1 00:00:00 2000 GMT", "staged": False}
    assert asyncio.run(renewal.maybe_renew(d, Target(), ping)) == "later"  # the leader renews
    d.sign_guard = lambda: "only the leader signs"
    assert asyncio.run(renewal.maybe_renew(d, Target(), ping)) is None  # a follower does not
    assert calls == ["web1"]


# ----- draining: HAProxy soft stop ---------------------------------------------------------------


def test_ready_while_draining_is_404_for_the_balancer_and_503_otherwise(tmp_path: Path) -> None:
    import asyncio
    import time

    import httpx

    from dispatcher.api.healthport import InstanceState, LocalRole, create_health_app

    cfg = make_cfg(tmp_path)
    populate(tmp_path, {"etc/dispatcher.crt": b"c", "etc/dispatcher.key": b"k"})
    state = InstanceState(serving=True, last_tick=time.time())
    syncing: list[str | None] = ["initial sync with the published generation"]
    state.not_ready = lambda: syncing[0]
    app = create_health_app(cfg, LocalRole("i", 5), state)

    async def get(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://h") as c:
            return await c.get(path)

    def code(path: str) -> int:
        return asyncio.run(get(path)).status_code

    r = asyncio.run(get("/ready"))
    assert r.status_code == 503 and r.json()["reason"].startswith("initial sync")
    # to HAProxy not in sync is a soft stop (sessions finish), as draining is
    r = asyncio.run(get("/ready?drain=404"))
    assert r.status_code == 404 and r.json()["reason"].startswith("initial sync")
    syncing[0] = None
    assert code("/ready") == 200 and code("/ready?drain=404") == 200
    state.draining = True
    assert code("/ready") == 503
    r = asyncio.run(get("/ready?drain=404"))
    assert r.status_code == 404 and r.json()["reason"] == "draining"
    assert asyncio.run(get("/status")).json()["draining"] is True


def test_a_follower_without_the_key_takes_it_only_when_it_seals_the_generation(
    tmp_path: Path,
) -> None:
    follower_ca = tmp_path / "follower" / "etc"
    rig = Rig(tmp_path, records=Records.for_ca_dir(follower_ca, "follower"))
    assert rig.records.problem is not None  # no key: every record refused
    rig.syncer.follower.BOOT_RETRY = 0.0  # no wait between two tries here
    # the leader serves a key that is not the one it sealed with: refused, nothing written
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca", "etc/cluster.key": b"ab" * 32 + b"\n"})
    assert not rig.syncer.follower.handle(rig.sealed(generation_of(rig.leader_cfg, 1)), rev=1)
    assert not (follower_ca / "cluster.key").exists() and rig.syncer.generation == 0
    # the real key: fetched, checked against the generation's MAC, written 0600, applied
    write_key(tmp_path / "leader" / "etc" / "cluster.key", KEY)
    assert rig.syncer.follower.handle(rig.sealed(generation_of(rig.leader_cfg, 2)), rev=2)
    assert (follower_ca / "cluster.key").read_bytes() == (
        tmp_path / "leader" / "etc" / "cluster.key").read_bytes()  # fmt: skip
    assert os.stat(follower_ca / "cluster.key").st_mode & 0o777 == 0o600
    assert rig.records.problem is None and rig.syncer.generation == 2


# ----- the leader's push -----------------------------------------------------------------------


def pushed_rig(tmp_path: Path) -> tuple[Rig, Generation, bytes, dict[str, bytes], int]:
    """A follower whose files lag generation 1 of the leader's directory, the head of which
    is published in the store; its fetcher is the real one, and nobody serves files (a
    fetch fails): only pushed files can bring it there."""
    rig = Rig(tmp_path)
    del rig.syncer.fetcher.fetch  # the real fetch: the "leader" at 127.0.0.1:1 answers nothing
    rig.syncer.fetcher.TIMEOUT = 1.0
    populate(tmp_path / "leader", {"etc/ca.crt": b"ca-new", "agents/web1.json": b'{"n":2}'})
    populate(tmp_path / "follower", {"etc/ca.crt": b"ca-old", "agents/web1.json": b'{"n":1}'})
    g = generation_of(rig.leader_cfg)
    head, chunks = rig.leader_records.seal_generation(rig.backend.keys.generation, g)
    rev = rig.backend.put_value(rig.backend.keys.generation, head)
    files = {p: Layout(rig.leader_cfg).local(p).read_bytes() for p in g.files}
    return rig, g, head.encode(), {**chunks, **files}, rev


def test_a_pushed_generation_is_applied_without_reading_chunks_or_fetching(
    tmp_path: Path,
) -> None:
    from dispatcher.ha.sync.push import decode, encode

    rig, g, head, both, rev = pushed_rig(tmp_path)
    chunks = {k: v for k, v in both.items() if k not in g.files}
    files = {k: v for k, v in both.items() if k in g.files}
    read: list[str] = []
    real = rig.backend.get_value
    rig.backend.get_value = lambda key: read.append(key) or real(key)  # type: ignore[method-assign, func-returns-value]
    assert rig.syncer.follower.pushed(decode(encode(head, rev, chunks, files))) == 1
    assert not [k for k in read if "generation-chunks" in k]  # the pushed chunks served
    f = tmp_path / "follower"
    assert (f / "etc" / "ca.crt").read_bytes() == b"ca-new"
    assert (f / "agents" / "web1.json").read_bytes() == b'{"n":2}'
    assert rig.syncer.follower.in_sync() or rig.syncer.generation == 1
    # the watch brings the same head afterwards: nothing to do
    assert rig.syncer.follower.handle(head, rev)


def test_a_push_is_refused_unless_it_is_the_head_the_store_holds(tmp_path: Path) -> None:
    from dispatcher.ha.sync.push import Pushed, PushRefused

    rig, g, head, both, rev = pushed_rig(tmp_path)
    files = {k: v for k, v in both.items() if k in g.files}
    f = tmp_path / "follower"
    # a sealed head of a generation the store never published (a replay, or a leader
    # whose transaction failed): refused before anything is read or written
    other = generation_of(rig.leader_cfg, 7)
    forged, _ = rig.leader_records.seal_generation(rig.backend.keys.generation, other)
    with pytest.raises(PushRefused, match="not the generation head the store holds"):
        rig.syncer.follower.pushed(Pushed(forged.encode(), rev, {}, files))
    with pytest.raises(PushRefused, match="leads"):
        rig.syncer.follower.pushed(Pushed(head, rev, {}, files), leading=lambda: True)
    assert (f / "etc" / "ca.crt").read_bytes() == b"ca-old" and rig.syncer.generation == 0


def test_a_push_of_the_head_the_watch_delivered_is_applied_without_reading_it_again(
    tmp_path: Path,
) -> None:
    """The follower's watch delivered the head (value and revision) before the push came:
    etcd's head is known, no read. A push of any other head is read and checked as ever."""
    from dispatcher.ha.sync.push import Pushed, PushRefused

    rig, g, head, both, rev = pushed_rig(tmp_path)
    chunks = {k: v for k, v in both.items() if k not in g.files}
    files = {k: v for k, v in both.items() if k in g.files}
    follower = rig.syncer.follower
    reads: list[str] = []
    real = rig.backend.get_kv
    rig.backend.get_kv = lambda key: reads.append(key) or real(key)  # type: ignore[method-assign, func-returns-value]
    # a sealed head the store never held, pushed right after the watch delivered the real
    # one: it is not the watched head, so it is read, and refused
    other = generation_of(rig.leader_cfg, 7)
    forged, _ = rig.leader_records.seal_generation(rig.backend.keys.generation, other)
    follower._watched = (rev, head)  # what Follower.step keeps of the event it watched
    with pytest.raises(PushRefused, match="not the generation head the store holds"):
        follower.pushed(Pushed(forged.encode(), rev, chunks, files))
    assert reads == [rig.backend.keys.generation] and rig.syncer.generation == 0
    # the watched head itself: applied, nothing read
    reads.clear()
    follower._watched = (rev, head)
    assert follower.pushed(Pushed(head, rev, chunks, files)) == 1
    assert reads == [] and rig.syncer.generation == 1
    assert (tmp_path / "follower" / "etc" / "ca.crt").read_bytes() == b"ca-new"


def test_the_watched_event_of_a_pushed_head_is_not_read_again(tmp_path: Path) -> None:
    """The push applied the head; its watch event then comes: the follower watches on
    after it (the key's watch is one long-lived stream), reading nothing."""
    from cluster.store import WatchEvent
    from dispatcher.ha.sync.push import Pushed

    rig, g, head, both, rev = pushed_rig(tmp_path)
    chunks = {k: v for k, v in both.items() if k not in g.files}
    files = {k: v for k, v in both.items() if k in g.files}
    follower = rig.syncer.follower
    follower._watched = (rev, head)
    assert follower.pushed(Pushed(head, rev, chunks, files)) == 1
    follower._need_read, follower._next_read = False, rig.now + 3600  # read at start
    reads: list[str] = []
    rig.backend.revision = lambda: reads.append("revision") or 0  # type: ignore[method-assign, func-returns-value]
    rig.backend.get_kv = lambda key: reads.append(key)  # type: ignore[method-assign]
    starts: list[int | None] = []
    events = [WatchEvent("PUT", rig.backend.keys.generation, head, rev)]

    def watch(key: str, timeout: float, start_revision: int | None = None) -> WatchEvent | None:
        starts.append(start_revision)
        return events.pop(0) if events else None

    rig.backend.watch_key = watch  # type: ignore[method-assign]
    follower.step()  # the event of the head the push applied
    follower.step()  # the next wait starts after it
    assert reads == [] and starts[1] == rev + 1 and rig.syncer.generation == 1


def test_a_pushed_file_that_is_not_the_manifests_is_never_written(tmp_path: Path) -> None:
    from dispatcher.ha.sync.push import Pushed, PushRefused

    rig, g, head, both, rev = pushed_rig(tmp_path)
    files = {k: v for k, v in both.items() if k in g.files}
    chunks = {k: v for k, v in both.items() if k not in g.files}
    ca = next(p for p in files if p.endswith("ca.crt"))
    files[ca] = b"forged-ca"  # not the sha256 the sealed manifest names
    before = {p: p.read_bytes() for p in (tmp_path / "follower").rglob("*") if p.is_file()}
    with pytest.raises(PushRefused, match="does not match the manifest"):
        rig.syncer.follower.pushed(Pushed(head, rev, chunks, files))
    after = {p: p.read_bytes() for p in (tmp_path / "follower").rglob("*") if p.is_file()}
    # (a stage directory may be left: removed at the next apply, never read)
    assert {p: v for p, v in after.items() if not {"sync", STAGE_DIR} & set(p.parts)} == {
        p: v for p, v in before.items() if "sync" not in p.parts}  # fmt: skip
    assert rig.syncer.generation == 0


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"head": 1, "rev": 1}', b'{"head": "!!", "rev": 1}',
    b'{"head": "aGVhZA==", "rev": true}', b'{"head": "aGVhZA==", "rev": 1, "files": {"a": 1}}',
])  # fmt: skip
def test_a_malformed_push_is_refused(body: bytes) -> None:
    from dispatcher.ha.sync.push import PushRefused, decode

    with pytest.raises(PushRefused):
        decode(body)
