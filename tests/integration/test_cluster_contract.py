"""One contract for both coordination backends: embedded (local state dir) and etcd.

Every test runs three times: against :class:`LocalBackend` in a temp dir, against
:class:`EtcdBackend` on a real one-member etcd (skipped, with the reason, when etcd is
not installed), and on one with TLS and authentication, as a user whose role covers only
the test's cluster prefix. "Two clients" are two backend objects, as two instances would have.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.backend import EtcdBackend, KVBackend, LocalBackend, MemberInfo
from cluster.election import Elector, EpochGuard
from cluster.errors import BackendUnavailable, Fenced, MemberConflict, NotLeader, StaleEpoch
from cluster.locks import ClusterRunLocks, LockConflict
from cluster.session import Session
from ops.lab.etcd import ETCD, SKIP_REASON, EtcdCluster, TLSFiles, secure_etcd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Factory = Callable[[], KVBackend]


@pytest.fixture(scope="module")
def etcd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd1"), size=1)
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def etcd_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """TLS and auth on (docs/trust-model.md); every test adds a user for its own prefix."""
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    cluster = secure_etcd(tmp_path_factory.mktemp("etcd-auth"), "/contract-unused/")
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture(params=["local", "etcd", "etcd-auth"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    name = f"t{secrets.token_hex(4)}"  # one cluster namespace per test
    made: list[KVBackend] = []
    if request.param == "etcd":
        etcd: EtcdCluster = request.getfixturevalue("etcd1")

        def factory() -> KVBackend:
            b = EtcdBackend(etcd.endpoints, cluster_name=name, timeout=1.0)
            made.append(b)
            return b
    elif request.param == "etcd-auth":
        # a role limited to this test's /<name>/: any key outside it fails the test
        secure: EtcdCluster = request.getfixturevalue("etcd_auth")
        password = secure.add_user(name, f"/{name}/", secure.root_token()).read_text().strip()
        kw = {**secure.client_kwargs(), "user": name, "password": password}

        def factory() -> KVBackend:
            b = EtcdBackend(secure.endpoints, cluster_name=name, timeout=1.0, **kw)
            made.append(b)
            return b
    else:

        def factory() -> KVBackend:
            b = LocalBackend(tmp_path / "state", cluster_name=name)
            made.append(b)
            return b

    yield factory
    for b in made:
        b.close()


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.01) -> float:
    """Seconds until ``cond()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic() - start


def test_campaign_leader_and_epochs_grow(make_backend: Factory) -> None:
    a, b = make_backend(), make_backend()
    la, lb = a.lease_grant(5), b.lease_grant(5)
    ra = a.campaign(la.id, "a")
    assert ra.won and ra.leader is not None
    e1 = ra.leader.epoch
    assert e1 > 0
    assert a.campaign(la.id, "a").won  # repeating our own campaign keeps the same epoch
    assert a.leader() == ra.leader
    rb = b.campaign(lb.id, "b")
    assert not rb.won
    assert rb.leader is not None and rb.leader.instance_id == "a" and rb.leader.epoch == e1
    assert rb.revision >= e1
    assert b.leader() is not None and b.leader().instance_id == "a"  # type: ignore[union-attr]

    a.resign(la.id)
    assert b.leader() is None
    assert b.keepalive(la.id) <= 0
    rb = b.campaign(lb.id, "b")
    assert rb.won and rb.leader is not None and rb.leader.epoch > e1
    e2 = rb.leader.epoch
    la2 = a.lease_grant(5)
    b.resign(lb.id)
    ra = a.campaign(la2.id, "a")
    assert ra.won and ra.leader is not None and ra.leader.epoch > e2
    a.resign(la2.id)


def test_wait_leader_change_wakes_on_resign(make_backend: Factory) -> None:
    a, b = make_backend(), make_backend()
    la, lb = a.lease_grant(5), b.lease_grant(5)
    assert a.campaign(la.id, "a").won
    res = b.campaign(lb.id, "b")
    t0 = time.monotonic()
    assert not b.wait_leader_change(res.revision + 1, 0.3)  # nothing happens: times out
    assert 0.25 < time.monotonic() - t0 < 2.0
    a.resign(la.id)
    t0 = time.monotonic()
    assert b.wait_leader_change(res.revision + 1, 2.0)  # the delete already happened
    assert time.monotonic() - t0 < 0.5
    b.resign(lb.id)


def test_resign_hands_over_fast(make_backend: Factory) -> None:
    elected: list[tuple[str, int]] = []
    ea = Elector(make_backend(), "a", ttl=2, on_elected=lambda e: elected.append(("a", e)))
    eb = Elector(make_backend(), "b", ttl=2, on_elected=lambda e: elected.append(("b", e)))
    ea.start()
    wait_for(ea.is_leader, 5)
    eb.start()
    time.sleep(0.3)  # b is following (watching) now
    assert not eb.is_leader()
    t0 = time.monotonic()
    ea.resign()
    assert not ea.is_leader()
    took = wait_for(eb.is_leader, 2)
    print(f"\n[{type(ea.backend).__name__}] resign -> peer leads after {took * 1000:.0f} ms")
    assert took < 1.0, took
    assert [n for n, _ in elected] == ["a", "b"]
    assert elected[1][1] > elected[0][1]
    assert eb.epoch == elected[1][1]
    assert 0 < (eb.lease_time_left() or 0) <= 2
    eb.stop()
    ea.stop()
    assert time.monotonic() - t0 < 10


def test_stale_epoch_is_fenced(make_backend: Factory) -> None:
    a, b = make_backend(), make_backend()
    la, lb = a.lease_grant(5), b.lease_grant(5)
    e1 = a.campaign(la.id, "a").leader.epoch  # type: ignore[union-attr]
    gen = a.keys.generation
    assert a.fenced_commit(e1, {gen: "1"})
    r1 = a.record_effect(e1, "publish", "a", {"generation": 1})
    assert r1 is not None and r1.epoch == e1
    a.resign(la.id)
    e2 = b.campaign(lb.id, "b").leader.epoch  # type: ignore[union-attr]
    assert e2 > e1
    # the old leader's writes are refused from now on
    assert not a.fenced_commit(e1, {gen: "stale"})
    assert a.record_effect(e1, "publish", "a", {"generation": 2}) is None
    assert not a.fenced_commit(0, {gen: "zero"})
    r2 = b.record_effect(e2, "publish", "b", {"generation": 2}, puts={gen: "2"})
    assert r2 is not None and r2.revision > r1.revision
    kv = b.store.get(gen)
    assert kv is not None and kv.value == b"2"
    history = b.effects()
    assert [(h.instance_id, h.epoch) for h in history] == [("a", e1), ("b", e2)]
    b.resign(lb.id)


def test_elector_fenced_helper(make_backend: Factory) -> None:
    other = make_backend()
    el = Elector(make_backend(), "a", ttl=6).start()
    try:
        wait_for(el.is_leader, 5)
        e1 = el.epoch
        assert e1 is not None
        assert el.fenced("sign-cert", lambda epoch: epoch * 2, detail={"cn": "h1"}) == 2 * e1
        rec = el.commit("publish-generation", puts={other.keys.generation: "7"})
        assert rec.epoch == e1

        def usurp(epoch: int) -> None:
            # a peer takes over while the effect runs: revoke a's lease, win a new epoch
            leader = other.leader()
            assert leader is not None and leader.epoch == epoch
            other.resign(leader.lease)
            lb = other.lease_grant(5)
            assert other.campaign(lb.id, "b").won

        with pytest.raises(Fenced) as info:
            el.fenced("approve-pairing", usurp)
        assert info.value.epoch == e1
        effects = other.effects()
        assert [e.effect for e in effects] == ["sign-cert", "publish-generation"]
        assert all(e.epoch == e1 for e in effects)
        wait_for(lambda: not el.is_leader(), 15)  # its next keep-alive notices
        with pytest.raises(NotLeader):
            el.fenced("anything", lambda epoch: None)
    finally:
        el.stop()


def test_epoch_guard_refuses_older() -> None:
    g = EpochGuard()
    g.check(5)
    g.check(5)
    g.check(9)
    with pytest.raises(StaleEpoch):
        g.check(7)
    assert g.newest == 9


def test_run_locks_conflict_across_clients(make_backend: Factory) -> None:
    ba, bb = make_backend(), make_backend()
    sa = Session(ba, ttl=5).start()
    sb = Session(bb, ttl=5).start()
    try:
        la = ClusterRunLocks(ba, sa, owner="a")
        lb = ClusterRunLocks(bb, sb, owner="b")
        held = la.acquire_all([("h1", "s1"), ("h2", "s1"), ("h1", "s1")])
        assert held.pairs == [("h1", "s1"), ("h2", "s1")]
        with pytest.raises(LockConflict) as info:
            lb.acquire_all([("h3", "s1"), ("h2", "s1"), ("h1", "s1")])
        assert sorted(info.value.conflicts) == ["h1:s1", "h2:s1"]
        assert lb.list_held() == [("h1", "s1"), ("h2", "s1")]  # all or none: no h3
        with lb.acquire_all([("h3", "s1"), ("h1", "s2")]) as other:
            assert other.held and not other.lost
            assert la.list_held() == [("h1", "s1"), ("h1", "s2"), ("h2", "s1"), ("h3", "s1")]
        held.release()
        held.release()  # twice is harmless
        assert la.list_held() == []
        again = lb.acquire_all([("h1", "s1")])
        # a lost session frees the locks for everyone
        sb.close(revoke=True)
        assert la.list_held() == []
        assert again.lost
        la.acquire_all([("h1", "s1")]).release()
    finally:
        sa.close()
        sb.close()


def test_many_locks_all_or_none(make_backend: Factory) -> None:
    ba, bb = make_backend(), make_backend()
    sa, sb = Session(ba, ttl=5), Session(bb, ttl=5)
    try:
        la = ClusterRunLocks(ba, sa, owner="a")
        lb = ClusterRunLocks(bb, sb, owner="b")
        blocker = lb.acquire_all([("h250", "s")])
        pairs = [(f"h{i}", "s") for i in range(260)]  # more than one transaction's worth
        with pytest.raises(LockConflict) as info:
            la.acquire_all(pairs)
        assert info.value.conflicts == ["h250:s"]
        assert la.list_held() == [("h250", "s")]
        blocker.release()
        with la.acquire_all(pairs):
            assert len(lb.list_held()) == 260
        assert lb.list_held() == []
    finally:
        sa.close()
        sb.close()


def test_members_registered_and_gone_with_lease(make_backend: Factory) -> None:
    ba, bb = make_backend(), make_backend()
    ma = MemberInfo("a", advertise_url="https://127.0.0.1:7445", version="1.0", cert_serial="0a")
    sa = Session(ba, ttl=5, member=ma).start()
    sb = Session(bb, ttl=5, member=MemberInfo("b", generation=3)).start()
    try:
        sa.lease_id()
        sb.lease_id()
        assert [m.instance_id for m in bb.members()] == ["a", "b"]
        assert ba.members()[0] == ma
        sa.update_member(state="draining", generation=4)
        got = {m.instance_id: m for m in bb.members()}
        assert got["a"].state == "draining" and got["a"].generation == 4
        assert got["b"].generation == 3 and got["b"].state == "serving"
        sa.close(revoke=True)
        assert [m.instance_id for m in bb.members()] == ["b"]
    finally:
        sa.close()
        sb.close()


def test_etcd_over_tls_ignores_requests_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mTLS to etcd works although REQUESTS_CA_BUNDLE names another CA (own session)."""
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("ctrl-exec-dispatcher")
    files = {
        "ca": tmp_path / "ca.crt",
        "server_cert": tmp_path / "server.crt",
        "server_key": tmp_path / "server.key",
        "client_cert": tmp_path / "client.crt",
        "client_key": tmp_path / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["server_cert"]))
    server.private_key_pem.write_to_path(str(files["server_key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.crt"))

    cluster = EtcdCluster(tmp_path / "etcd", size=1, tls=TLSFiles(**files))
    cluster.start()
    try:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "other-ca.crt"))
        monkeypatch.setenv("CURL_CA_BUNDLE", str(tmp_path / "other-ca.crt"))
        assert cluster.endpoints[0].startswith("https://")
        b = EtcdBackend(
            cluster.endpoints,
            cluster_name="tls",
            ca=str(files["ca"]),
            cert=str(files["client_cert"]),
            key=str(files["client_key"]),
        )
        lease = b.lease_grant(5)
        assert b.campaign(lease.id, "a").won
        b.resign(lease.id)
        b.close()
        # without a client certificate etcd refuses us, and we say so with one error type
        nocert = EtcdBackend(cluster.endpoints, cluster_name="tls", ca=str(files["ca"]))
        with pytest.raises(BackendUnavailable):
            nocert.leader()
        nocert.close()
        # a wrong CA is refused too (the env bundle did not sneak in either way)
        wrong = EtcdBackend(
            cluster.endpoints,
            cluster_name="tls",
            ca=str(tmp_path / "other-ca.crt"),
            cert=str(files["client_cert"]),
            key=str(files["client_key"]),
        )
        with pytest.raises(BackendUnavailable):
            wrong.leader()
        wrong.close()
    finally:
        cluster.close()


# ----- exclusive membership --------------------------------------------------------------------


def test_member_key_is_exclusive(make_backend: Factory) -> None:
    """Created only if absent, rewritten and deleted only under the lease that holds it."""
    ba, bb = make_backend(), make_backend()
    la, lb = ba.lease_grant(5), bb.lease_grant(5)
    ma = MemberInfo("x", advertise_url="http://127.0.0.1:7001", pid=11, host="ha")
    mb = MemberInfo("x", advertise_url="http://127.0.0.1:7002", pid=22, host="hb")
    first = ba.claim_member(la.id, ma)
    assert first.held and first.created
    again = ba.claim_member(la.id, ma)  # a repeat under the same lease: still ours
    assert again.held and not again.created
    other = bb.claim_member(lb.id, mb)
    assert not other.held and other.holder == ma and other.holder_lease == la.id
    assert not bb.update_member(lb.id, mb)
    assert not bb.release_member(lb.id, "x")
    assert bb.members() == [ma]
    assert ba.update_member(la.id, replace(ma, generation=7))
    assert bb.members()[0].generation == 7
    assert ba.release_member(la.id, "x") and bb.members() == []
    assert not ba.update_member(la.id, ma)  # gone: an update never re-creates it
    assert bb.members() == []
    assert bb.claim_member(lb.id, mb).created
    ba.resign(la.id)  # revoking the old lease leaves the new holder's key alone
    assert bb.members() == [mb]
    bb.resign(lb.id)
    assert ba.members() == []


def test_second_session_with_the_same_id_is_refused(make_backend: Factory) -> None:
    ba, bb = make_backend(), make_backend()
    ma = MemberInfo("x", advertise_url="http://127.0.0.1:7001", pid=11, host="ha", since=1e9)
    sa = Session(ba, ttl=2, member=ma).join()
    sb = Session(bb, ttl=2, member=MemberInfo("x", advertise_url="http://127.0.0.1:7002"))
    try:
        t0 = time.monotonic()
        with pytest.raises(MemberConflict) as err:
            sb.join(wait=0.5)
        assert 0.4 < time.monotonic() - t0 < 3
        assert err.value.kind == "instance_id" and err.value.holder_id == "x"
        msg = str(err.value)
        assert "'x' is already a live member" in msg and "http://127.0.0.1:7001" in msg
        assert "pid 11 on host ha" in msg and "since 2001-09-09T01:46:40Z" in msg
        assert not sb.holds_member() and sa.holds_member()
        sb.close()
        assert ba.members() == [ma]  # the refused one deleted nothing
        time.sleep(1.0)  # a keep-alive round of sa: still registered, still its record
        assert bb.members() == [ma] and sa.holds_member()
    finally:
        sa.close()
        sb.close()
    assert ba.members() == []


def test_duplicate_advertise_url_is_refused(make_backend: Factory) -> None:
    ba, bb = make_backend(), make_backend()
    sa = Session(ba, ttl=2, member=MemberInfo("a", advertise_url="https://h1:7445/")).join()
    sb = Session(bb, ttl=2, member=MemberInfo("b", advertise_url="https://H1:7445"))
    sc = Session(bb, ttl=2, member=MemberInfo("c", advertise_url="https://h1:7446"))
    try:
        with pytest.raises(MemberConflict) as err:
            sb.join(wait=0.2)
        assert err.value.kind == "advertise_url" and err.value.holder_id == "a"
        assert "already advertised by live member 'a'" in str(err.value)
        sc.join()  # same host, another port: fine
        assert [m.instance_id for m in ba.members()] == ["a", "c"]
    finally:
        sa.close()
        sb.close()
        sc.close()


def test_member_key_comes_back_after_loss(make_backend: Factory) -> None:
    """Deleted by hand, or its lease gone (expired after a pause): registered again."""
    ba, admin = make_backend(), make_backend()
    sa = Session(ba, ttl=2, member=MemberInfo("a", generation=3)).join()
    try:
        key = admin.keys.member("a")
        assert admin.delete_value(key)
        took = wait_for(lambda: admin.get_kv(key) is not None, 3)
        assert took < 2 and admin.members()[0].generation == 3
        old = sa.current_lease_id()
        assert old is not None
        admin.resign(old)  # as if the lease had expired (local: only the key goes)

        def back() -> bool:
            kv = admin.get_kv(key)
            return kv is not None and kv.lease == sa.current_lease_id() and sa.holds_member()

        assert wait_for(back, 4) < 3
        if admin.kind == "etcd":  # a new lease (a local lease is the process: still there)
            assert sa.current_lease_id() != old
    finally:
        sa.close()
    assert admin.members() == []


def test_a_member_that_lost_its_key_to_another_never_deletes_it(make_backend: Factory) -> None:
    ba, bb, admin = make_backend(), make_backend(), make_backend()
    seen: list[MemberConflict] = []
    sa = Session(ba, ttl=2, member=MemberInfo("x", pid=1), on_conflict=seen.append).join()
    lb = bb.lease_grant(5)
    try:
        key = admin.keys.member("x")
        taken = MemberInfo("x", pid=2)
        # between two keep-alive rounds of sa, another process takes the freed key
        for _ in range(50):
            admin.delete_value(key)
            if bb.claim_member(lb.id, taken).created:
                break
        wait_for(lambda: bool(seen), 3)
        assert seen[0].kind == "instance_id" and "pid 2" in str(seen[0])
        assert not sa.holds_member()
        assert admin.members() == [taken]
        sa.close()
        assert admin.members() == [taken]  # closing deleted only what was its own
    finally:
        sa.close()
        # clean-up only: a revoke lost to a busy etcd lets the lease expire (5 s) instead
        with contextlib.suppress(BackendUnavailable):
            bb.resign(lb.id)


def test_election_waits_for_the_member_key(make_backend: Factory) -> None:
    """An instance whose member key another process holds never campaigns."""
    ba, bb = make_backend(), make_backend()
    holder = Session(ba, ttl=2, member=MemberInfo("x", pid=1)).join()
    twin = Session(bb, ttl=2, member=MemberInfo("x", pid=2))
    twin.start()  # as when etcd was unreachable at its start: the thread claims later
    elector = Elector(make_backend(), "x", ttl=2, gate=twin.holds_member)
    elector.start()
    try:
        wait_for(lambda: twin.conflict is not None, 3)
        time.sleep(0.5)
        assert not elector.is_leader() and ba.leader() is None
        holder.close()  # the key is free: the twin takes it, then campaigns
        wait_for(twin.holds_member, 3)
        wait_for(elector.is_leader, 3)
    finally:
        elector.stop()
        holder.close()
        twin.close()
