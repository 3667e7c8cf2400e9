"""Three real ``ctrl-exec-api`` instances on one real etcd (lease TTL 2 s), real agents.

The instances share the CA dir, the registry and ``rotation.json`` (as on a shared
filesystem); each has its own state dir (run records, locks, pairing queue), so async
status on another instance can only come through etcd. Measured (printed with ``-s``):
failover after kill -9 of the leader, and after SIGTERM (resign).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cluster.election import Elector
from dispatcher.errors import NotLeaderError
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.ha.writer import FencedWriter
from dispatcher.pairing import queue as pq
from dispatcher.statewrite import LocalWriter
from ops.lab.apicalls import STATUS_KEYS, overlapping_runs
from ops.lab.etcd import ETCD, SKIP_REASON
from ops.lab.hacluster import (
    Cluster,
    ClusterSpec,
    Inst,
    get,
    make_csr,
    new_leader,
    pairing_listening,
    read_framed,
    running_cluster,
    wait_until,
)
from ops.lab.haproxy import HAPROXY
from ops.lab.haproxy import SKIP_REASON as HAPROXY_SKIP
from ops.lab.pairing import pairing_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

TTL = 2
NAMES = ("a", "b", "c")
AGENTS = {"web1": "127.0.0.2", "web2": "127.0.0.3"}
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, script_dir: Path) -> Iterator[Cluster]:
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    scripts = {n: str(script_dir / f"{n}.sh") for n in ("echo-args", "sleep1")}
    spec = ClusterSpec(agents=AGENTS, scripts=scripts, ttl=TTL, etcd_size=1, names=NAMES)
    c: Cluster | None = None
    try:
        with running_cluster(tmp_path_factory.mktemp("ha"), spec) as c:
            yield c
    finally:
        if MEASURED:
            print("\nHA measurements:", json.dumps(MEASURED))
    assert c is not None and all(code == 0 for code in c.exit_codes.values()), c and c.exit_codes


def cluster_cli(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return c.ced(c.insts["a"], "cluster", *args, timeout=30)


# ----- election, status, members ----------------------------------------------------------


def test_one_leader_and_consistent_status(cluster: Cluster) -> None:
    leader = cluster.one_leader()
    # the first leader publishes generation 1 soon after its election (not at once)
    wait_until(lambda: leader.status()["generation"] >= 1, 5, "the first generation")
    docs = {i.name: i.status() for i in cluster.insts.values()}
    epoch = docs[leader.name]["epoch"]
    for name, st in docs.items():
        inst = cluster.insts[name]
        assert set(st) >= STATUS_KEYS, (name, st)
        assert st["instance_id"] == inst.id
        assert st["leader_id"] == leader.id and st["epoch"] == epoch, (name, st)
        assert isinstance(st["epoch"], int) and st["epoch"] > 0
        # the first leader publishes generation 1 (or more); every member applies it
        gen = docs[leader.name]["generation"]
        assert gen >= 1 and st["etcd"] == "ok" and st["backend"] == "etcd"
        assert wait_until(lambda i=inst, g=gen: i.status()["generation"] >= g, 5, "sync")
        assert st["cert_serial"] == cluster.dispatcher.serial_hex
        tick = datetime.strptime(st["last_tick_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - tick).total_seconds()) < 5
        if inst is leader:
            assert st["role"] == "leader" and st["lease_ttl"] == TTL
            assert 0 < st["lease_time_left"] <= TTL
        else:
            assert st["role"] == "follower"
            assert st["lease_ttl"] is None and st["lease_time_left"] is None
            assert get(f"{inst.health_url}/leader")[0] == 503
        # the pairing listener runs on the leader only
        assert pairing_listening(inst) == (inst is leader), inst.name

    p = cluster_cli(cluster, "status", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["ok"] == 1 and doc["leader"] == leader.id and doc["epoch"] == epoch
    assert [m["instance_id"] for m in doc["members"]] == ["inst-a", "inst-b", "inst-c"]
    for m in doc["members"]:
        inst = cluster.insts[m["instance_id"][-1]]
        assert m["role"] == ("leader" if inst is leader else "follower")
        assert m["state"] == "serving" and m["cert_serial"] == cluster.dispatcher.serial_hex
        assert m["advertise_url"] == inst.url and m["health_port"] == inst.health_port
    text = cluster_cli(cluster, "status")
    assert text.returncode == 0 and f"leader {leader.id}, epoch {epoch}" in text.stdout

    with cluster.client(leader) as c:
        metrics = c.get("/metrics").text
    assert "ctrl_exec_cluster_is_leader 1.0" in metrics
    assert "ctrl_exec_leader_changes_total" in metrics
    assert "ctrl_exec_sync_generation " in metrics  # the generation applied (1 or more)
    assert "ctrl_exec_sync_generation 0.0" not in metrics
    lease_left = [ln for ln in metrics.splitlines()
                  if ln.startswith("ctrl_exec_lease_time_left_seconds ")]  # fmt: skip
    assert lease_left and 0 < float(lease_left[0].split()[1]) <= TTL
    with cluster.client(cluster.followers()[0]) as c:
        assert "ctrl_exec_cluster_is_leader 0.0" in c.get("/metrics").text


def test_haproxy_config_for_the_members(cluster: Cluster) -> None:
    p = cluster_cli(cluster, "haproxy-config")
    assert p.returncode == 0, p.stderr
    for inst in cluster.insts.values():
        assert (
            f"server {inst.id} 127.0.0.1:{inst.api_port} check port {inst.health_port}" in p.stdout
        )
        assert (
            f"server {inst.id} 127.0.0.1:{inst.pairing_port} check port {inst.health_port}"
            in p.stdout
        )
    if HAPROXY is None:  # the configuration was checked above; HAProxy's own check is skipped
        pytest.skip(HAPROXY_SKIP)
    cfg = cluster.tmp / "haproxy.cfg"
    cfg.write_text(p.stdout.replace("/run/haproxy/ctrl-exec.sock",
                                    str(cluster.tmp / "haproxy.sock")))  # fmt: skip
    check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)],
                           capture_output=True, text=True, timeout=10)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


# ----- fencing and leader-only work ---------------------------------------------------------


def test_fenced_writer_on_a_follower_refuses(cluster: Cluster) -> None:
    leader = cluster.one_leader()
    backend = cluster.backend()
    probe = Elector(backend, "probe", ttl=TTL).start()
    try:
        wait_until(lambda: probe.last_leader is not None, 5, "the probe to see the leader")
        health = ClusterHealth()
        health.mark_ok()
        writer = FencedWriter(probe, health=health)
        target = cluster.registry_dir / "web1.json"
        before = target.read_bytes()
        n_effects = len(backend.effects())
        with pytest.raises(NotLeaderError, match="not the leader"):
            writer.write(target, b"{}")
        with pytest.raises(NotLeaderError):
            writer.delete(target)
        assert target.read_bytes() == before
        assert len(backend.effects()) == n_effects
        assert not probe.is_leader() and leader.alive
    finally:
        probe.stop(resign=True)
        backend.close()

    # a real follower: discovery runs, but caching agent tags (a registry write) is refused
    # (an agent that did not answer in time on a loaded machine returns no tags to cache:
    # ask again, at most three times, until one answered)
    follower = cluster.followers()[0]
    for _ in range(3):
        with cluster.client(follower) as c:
            r = c.get("/discovery")
        assert r.status_code == 200 and sorted(r.json()["hosts"]) == ["web1", "web2"], r.text
        if any(h.get("status") == "ok" for h in r.json()["hosts"].values()):
            break
    answered = r.json()["hosts"]
    assert any(h.get("status") == "ok" for h in answered.values()), answered
    # the instance writes its log from a queue on a thread of its own: the line may land
    # just after the answer
    wait_until(lambda: any("ACTION=discovery-tags" in ln and "not the leader" in ln
                           for ln in follower.logtext().splitlines()),
               10, "the refused tag write logged",
               error=lambda m: AssertionError(f"{m}\n{follower.logtext()[-2000:]}"))  # fmt: skip


def test_pairing_through_the_leader_decided_from_a_follower(cluster: Cluster) -> None:
    leader = cluster.one_leader()
    epoch = leader.status()["epoch"]
    follower = cluster.followers()[0]
    queue = leader.state / "pairing"
    # an agent asks the leader's 7444 listener (what HAProxy routes to /leader = 200)
    with pairing_request(leader.pairing_port, cluster.ca_cert, "paired-1", nonce="n-1",
                         timeout=15) as (first, fh):  # fmt: skip
        assert first["status"] == "pending"
        reqid = first["reqid"]
        other = pq.submit(queue, hostname="paired-2", csr=make_csr("paired-2"), nonce="n-2",
                          source_ip="127.0.0.9", writer=LocalWriter())  # fmt: skip
        with cluster.client(follower) as c:
            r = c.get("/pairing")
            assert r.status_code == 200, r.text
            listed = r.json()
            assert listed["leader"] == leader.id and listed["epoch"] == epoch
            assert {q["id"] for q in listed["requests"]} >= {reqid, other["id"]}
            assert all("csr" not in q and "nonce" not in q for q in listed["requests"])

            r = c.post(f"/pairing/{reqid}/approve", json={"lookup_by": "ip"})
            assert r.status_code == 200, r.text
            assert r.headers["x-ctrl-exec-served-by"] == leader.id
            got = r.json()
            assert (got["status"], got["leader"], got["epoch"]) == ("approved", leader.id, epoch)
            assert got["agent"] == "paired-1" and got["lookup_by"] == "ip"
            second = read_framed(fh)  # the leader's listener delivers the decision
            assert second["status"] == "approved" and second["nonce"] == "n-1"
            assert "BEGIN CERTIFICATE" in second["cert"]

            r = c.post(f"/pairing/{other['id']}/deny", json={"reason": "not ours"})
            assert r.status_code == 200 and r.json()["status"] == "denied", r.text
            r = c.post(f"/pairing/{other['id']}/deny", json={})
            assert r.status_code == 404, r.text  # a denial removes the request
            r = c.post("/pairing/x/approve", json={})
            assert (r.status_code, r.json()["error"]) == (404, "no such request")

    assert json.loads((queue / f"{other['id']}.denied").read_text())["reason"] == "not ours"
    record = cluster.registry_dir / "paired-1.json"
    assert json.loads(record.read_text())["ip"] == "127.0.0.9"
    # every write was committed in etcd under the leader's epoch before it happened
    backend = cluster.backend()
    try:
        effects = [e for e in backend.effects() if e.detail.get("path", "").startswith(
            (str(queue), str(cluster.registry_dir)))]  # fmt: skip
    finally:
        backend.close()
    assert effects and all(e.epoch == epoch and e.instance_id == leader.id for e in effects)
    approve = {e.detail["path"]: e.detail for e in effects if e.effect == "pairing-approve"}
    assert approve[str(record)]["sha256"] == hashlib.sha256(record.read_bytes()).hexdigest()
    kinds = {(e.effect, e.detail["op"], Path(e.detail["path"]).name) for e in effects}
    assert ("pairing-write", "write", f"{reqid}.json") in kinds  # queued by the listener
    assert ("pairing-write", "delete", f"{reqid}.approved") in kinds  # delivered
    assert f"EPOCH={epoch}" in leader.logtext()


def test_edit_agent_from_a_follower_host_is_carried_out_by_the_leader(cluster: Cluster) -> None:
    """``ced edit-agent`` run on a follower's host goes to the leader (one home for
    leader-only actions): the leader commits the registry writes under its epoch."""
    leader = cluster.one_leader()
    epoch = leader.status()["epoch"]
    follower = cluster.followers()[0]
    before = {e.revision for e in cluster.effects()}
    try:
        r = cluster.ced(follower, "--json", "edit-agent", "web2", "--rename", "web2-moved")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["hostname"] == "web2-moved"
        # sync_ack = majority: when ced answers, most members run the generation with it
        g = leader.status()["generation"]
        backend = cluster.backend()
        try:
            applied = [m.instance_id for m in backend.members() if m.generation >= g]
        finally:
            backend.close()
        assert len(applied) >= 2, (g, applied)
        fresh = [e for e in cluster.effects() if e.revision not in before]
        assert {"request-claim", "agent-edit", "request-done"} <= {e.effect for e in fresh}
        assert all(e.epoch == epoch and e.instance_id == leader.id for e in fresh)
        new = [e for e in fresh if e.effect == "agent-edit"]
        assert {(Path(e.detail["path"]).name, e.detail["op"]) for e in new} == {
            ("web2-moved.json", "write"), ("web2.json", "delete")}  # fmt: skip
        # a change that rewrites the same bytes is acknowledged too: the leader publishes
        # a generation for it even though no file changed (else the action would fail
        # with "not acknowledged" after sync_ack_timeout)
        port = json.loads(r.stdout)["port"]
        g = leader.status()["generation"]
        t0 = time.monotonic()
        r = cluster.ced(follower, "edit-agent", "web2-moved", "--agent-port", str(port))
        assert r.returncode == 0, r.stderr
        print(f"same-bytes edit acknowledged in {time.monotonic() - t0:.2f} s")
        assert leader.status()["generation"] > g
        r = cluster.ced(follower, "edit-agent", "nobody-here", "--agent-port", "7443")
        assert r.returncode == 1 and "Edit failed: no registry entry for 'nobody-here'" in r.stderr
    finally:
        r = cluster.ced(follower, "edit-agent", "web2-moved", "--rename", "web2")
    assert r.returncode == 0, r.stderr


def test_malformed_request_records_are_dropped_and_never_stop_the_loop(cluster: Cluster) -> None:
    """Anyone who can write to etcd can queue junk: each bad record is dropped and logged
    once, and a genuine request behind it is still carried out."""
    leader = cluster.one_leader()
    backend = cluster.backend()
    prefix = backend.keys.requests

    def sealed(rid: str, doc: dict[str, Any]) -> str:  # as a dispatcher host would write it
        return cluster.signer.seal("request", prefix + rid, {**doc, "id": rid, "at": time.time()})

    junk = {
        f"{prefix}evil/../x": sealed("evil/../x", {"kind": "list-requests", "args": {}}),
        f"{prefix}not-json": "{",
        f"{prefix}unsealed": json.dumps(
            {"id": "unsealed", "kind": "list-requests", "args": {}, "at": time.time()}
        ),
        f"{prefix}args-list": sealed("args-list", {"kind": "deny", "args": ["a"]}),
        f"{prefix}no-kind": sealed("no-kind", {"args": {}}),
        f"{prefix}bad-args": sealed(
            "bad-args", {"kind": "approve", "args": {"reqid": 1, "sudo": 1}}
        ),
    }
    try:
        for key, value in junk.items():
            backend.put_value(key, value)
        r = cluster.ced(cluster.followers()[0], "--json", "list-requests", timeout=30)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["ok"] == 1
        assert wait_until(lambda: not backend.get_prefix(prefix), 10, "junk dropped")
        result = backend.get_value(backend.keys.result("bad-args"))
        assert result is not None  # a well-formed record with bad arguments gets an answer
        doc = cluster.signer.open("result", backend.keys.result("bad-args"), result)
        assert doc["ok"] is False and "unknown argument(s) sudo" in doc["error"], doc
    finally:
        backend.close()
    log = leader.logtext()
    for name in ("evil/../x", "not-json", "unsealed", "args-list", "no-kind"):
        lines = [ln for ln in log.splitlines()
                 if "ACTION=request-drop " in ln and f" KEY={prefix}{name} " in ln]  # fmt: skip
        assert len(lines) == 1, (name, lines)


# ----- data plane --------------------------------------------------------------------------


def test_async_run_status_is_the_same_on_every_instance(cluster: Cluster) -> None:
    a, b, c = cluster.insts["a"], cluster.insts["b"], cluster.insts["c"]
    with cluster.client(a) as ca:
        r = ca.post("/run", json={"hosts": ["web1", "web2"], "script": "sleep1", "async": True})
    assert r.status_code == 202, r.text
    reqid = r.json()["reqid"]
    assert not (b.state / "runs" / f"{reqid}.json").exists()

    def done_on(inst: Inst) -> dict[str, Any] | None:
        with cluster.client(inst) as cl:
            st = cl.get(f"/status/{reqid}")
        assert st.status_code == 200, (inst.name, st.text)
        body: dict[str, Any] = st.json()
        return body if body["complete"] else None

    rec_b = wait_until(lambda: done_on(b), 15, "the run to complete (seen on b)", 0.3)
    rec_c = wait_until(lambda: done_on(c), 5, "the same on c", 0.3)
    rec_a = wait_until(lambda: done_on(a), 5, "the same on a", 0.3)
    for rec in (rec_a, rec_b, rec_c):
        assert rec["reqid"] == reqid and rec["mode"] == "async" and rec["pending"] == []
        for host in ("web1", "web2"):
            assert rec["hosts"][host]["status"] == "done" and rec["hosts"][host]["exit"] == 0
            assert "slept" in rec["hosts"][host]["stdout"]
    assert rec_a["hosts"] == rec_b["hosts"] == rec_c["hosts"]


def test_run_lock_is_cluster_wide(cluster: Cluster) -> None:
    a, b = cluster.insts["a"], cluster.insts["b"]
    first, r = overlapping_runs(lambda: cluster.client(a), lambda: cluster.client(b))
    assert r.status_code == 409, r.text
    assert r.json() == {"ok": False, "error": "locked", "code": 4, "conflicts": ["web2:sleep1"]}
    assert first is not None and first.status_code == 200


# ----- failover ----------------------------------------------------------------------------


def test_sigterm_of_the_leader_hands_over_at_once(cluster: Cluster) -> None:
    cluster.ensure_all_running()
    old = cluster.one_leader()
    old_epoch = old.status()["epoch"]
    t0 = old.signal(signal.SIGTERM)
    new, took = new_leader(cluster, old, t0, 5)
    MEASURED["sigterm_failover_ms"] = round(took * 1000)
    assert took < 1.0, took
    assert old.proc is not None and old.proc.wait(15) == 0
    assert new.status()["epoch"] > old_epoch
    assert "ACTION=leader-resign" in old.logtext()
    wait_until(lambda: pairing_listening(new), 2, "the pairing listener on the new leader")
    assert not pairing_listening(old)
    old.start()
    old.wait_healthy()
    assert cluster.one_leader() is new


def test_kill9_of_the_leader_fails_over_within_the_ttl(cluster: Cluster) -> None:
    cluster.ensure_all_running()
    old = cluster.one_leader()
    old_epoch = old.status()["epoch"]
    t0 = old.signal(signal.SIGKILL)
    new, took = new_leader(cluster, old, t0, TTL + 3)
    MEASURED["kill9_failover_ms"] = round(took * 1000)
    assert took < TTL + 1, took
    assert new.status()["epoch"] > old_epoch
    assert old.proc is not None and old.proc.wait(5) == -signal.SIGKILL
    old.start()
    old.wait_healthy()
    assert cluster.one_leader() is new


def test_cli_switchover(cluster: Cluster) -> None:
    cluster.ensure_all_running()
    old = cluster.one_leader()
    p = cluster_cli(cluster, "switchover", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["ok"] == 1 and doc["old_leader"] == old.id and doc["forced"] is False
    assert doc["leader"] != old.id and doc["epoch"] > doc["old_epoch"]
    MEASURED["cli_switchover_ms"] = round(doc["seconds"] * 1000)
    new = cluster.one_leader()
    assert new.id == doc["leader"]


def test_switchover_to_a_named_member_and_the_history_of_terms(cluster: Cluster) -> None:
    """``ced cluster switchover --to X`` lands on X (the others leave the campaign to it),
    a bad target is refused, and ``ced cluster history`` lists every change with its
    reason and a term counter."""
    from cluster import history
    from dispatcher.ha import switchover

    cluster.ensure_all_running()
    backend = cluster.backend()
    try:
        start = history.terms(backend)[0]
        changes: list[tuple[str, str]] = []
        for _ in range(3):  # each time to the follower listed last: not a lucky race
            old = cluster.one_leader()
            target = sorted(i.id for i in cluster.followers())[-1]
            p = cluster_cli(cluster, "switchover", "--to", target, "--json")
            assert p.returncode == 0, p.stderr
            doc = json.loads(p.stdout)
            assert (doc["old_leader"], doc["leader"], doc["forced"]) == (old.id, target, False)
            changes.append((old.id, target))
            cluster.one_leader()
        p = cluster_cli(cluster, "switchover", "--to", "no-such-member")
        assert p.returncode == 1 and "no-such-member is not a live member" in p.stderr
        # a request naming a bad target straight in the store: the leader refuses it
        info = backend.leader()
        assert info is not None
        switchover.post_request(backend, info, "pytest", to="no-such-member",
                                signer=cluster.signer)  # fmt: skip
        assert wait_until(lambda: backend.get_value(backend.keys.switchover) is None, 5, "seen")
        time.sleep(2 * TTL)
        assert backend.leader() == info
        leader = next(i for i in cluster.insts.values() if i.id == info.instance_id)
        assert "ACTION=switchover-refused" in leader.logtext()
    finally:
        backend.close()
    p = cluster_cli(cluster, "history", "--json")
    assert p.returncode == 0, p.stderr
    terms = [t for t in json.loads(p.stdout)["history"] if t["epoch"] > start.epoch]
    recent = list(reversed(terms))
    assert [(t["previous"], t["leader"]) for t in recent] == changes
    assert [t["term"] for t in recent] == [start.term + 1, start.term + 2, start.term + 3]
    for t in recent:
        assert t["reason"].startswith(f"switchover to {t['leader']} (requested by ced:"), t
    text = cluster_cli(cluster, "history").stdout
    assert text.splitlines()[0].split() == ["TERM", "EPOCH", "TIME", "FROM", "TO", "REASON"]


def test_pause_stops_automatic_work_until_resume(cluster: Cluster) -> None:
    cluster.ensure_all_running()
    p = cluster_cli(cluster, "pause", "--reason", "etcd upgrade", "--json")
    assert p.returncode == 0, p.stderr
    try:
        st = json.loads(cluster_cli(cluster, "status", "--json").stdout)
        assert st["paused"]["reason"] == "etcd upgrade" and st["paused"]["by"].startswith("ced:")
        assert "PAUSED by ced:" in cluster_cli(cluster, "status").stdout
        leader = cluster.one_leader()
        assert wait_until(lambda: "ACTION=cluster-paused" in leader.logtext(), 5, "paused")
    finally:
        p = cluster_cli(cluster, "resume", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["was_paused"] is True
    assert json.loads(cluster_cli(cluster, "status", "--json").stdout)["paused"] is None
    assert wait_until(lambda: "ACTION=cluster-resumed" in leader.logtext(), 5, "resumed")


# ----- etcd down: the data plane goes on, leader-only work fails fast ----------------------


def test_etcd_down_keeps_run_and_ping_and_fails_pairing_fast(cluster: Cluster) -> None:
    cluster.ensure_all_running()
    cluster.one_leader()
    cluster.etcd.stop_member(0)
    try:
        wait_until(lambda: all(i.status()["etcd"] == "unreachable" for i in cluster.running()),
                   5, "every instance to see etcd unreachable")  # fmt: skip
        for inst in cluster.running():
            with cluster.client(inst) as c:
                r = c.post("/ping", json={"hosts": ["web1", "web2"]})
                assert r.status_code == 200, (inst.name, r.text)
                assert [x["status"] for x in r.json()["results"]] == ["ok", "ok"]
                r = c.post("/run", json={"hosts": ["web1"], "script": "echo-args",
                                         "args": [inst.name]})  # fmt: skip
                assert r.status_code == 200, (inst.name, r.text)
                assert f"arg1=[{inst.name}]" in r.json()["results"][0]["stdout"]
                t = time.monotonic()
                r = c.post("/pairing/x/approve", json={})
                took = time.monotonic() - t
                assert r.status_code == 503, (inst.name, r.text)
                assert r.json()["error"] == "cluster unavailable"
                assert took < 1.0, took
        # nobody may act as leader once its lease could have expired (/leader turns 503 a
        # little earlier, while less than a quarter of the TTL is left)
        wait_until(lambda: all(i.status()["role"] == "unknown" for i in cluster.running()),
                   TTL + 1, "every instance to stop leading")  # fmt: skip
        assert not cluster.leaders()
        for inst in cluster.running():
            st = inst.status()
            assert st["leader_id"] is None and st["epoch"] > 0 and st["lease_time_left"] is None
        p = cluster_cli(cluster, "status", "--json")
        assert p.returncode == 1 and json.loads(p.stdout)["error"] == "cluster unavailable"
    finally:
        cluster.etcd.start_member(0)
    leader = cluster.one_leader(timeout=15)
    for inst in cluster.running():  # each instance's view follows within a monitor period

        def sees_leader(i: Inst = inst) -> bool:
            s = i.status()
            return bool(s["etcd"] == "ok" and s["leader_id"] == leader.id)

        wait_until(sees_leader, 2, f"{inst.name} to see etcd ok and {leader.id} leading")
