"""Generations, rolling restarts and certificate rotation in a real HA cluster.

Three ``ctrl-exec-api`` instances with *their own* state paths (``sync_mode = push``: the
files travel from the leader over mTLS), a one-member etcd (lease TTL 2 s), two real
agents and a real HAProxy in front (the configuration ``ced cluster haproxy-config``
prints). Measured (printed with ``-s``): rotation end to end under load, requests that
failed at the first attempt, time for a killed follower to converge.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.config import load as load_config
from dispatcher.ha.manifest import (
    Generation,
    Layout,
    Scanner,
    encode_generation,
    manifest_hash,
)
from dispatcher.pairing import queue as pq
from dispatcher.statewrite import LocalWriter
from ops.lab.etcd import ETCD, SKIP_REASON
from ops.lab.hacluster import (
    Cluster,
    ClusterSpec,
    Inst,
    make_csr,
    running_cluster,
    wait_until,
)
from ops.lab.haproxy import HAPROXY
from ops.lab.haproxy import SKIP_REASON as HAPROXY_SKIP
from ops.lab.net import client_ssl, served_serial
from ops.lab.pki import Issued

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.skipif(ETCD is None, reason=SKIP_REASON),
    pytest.mark.skipif(HAPROXY is None, reason=HAPROXY_SKIP),
]

TTL = 2
DRAIN = 1.0
AGENTS = {"web1": "127.0.0.2", "web2": "127.0.0.3"}
MEASURED: dict[str, Any] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, script_dir: Path) -> Iterator[Cluster]:
    spec = ClusterSpec(
        agents=AGENTS, scripts={"echo-args": str(script_dir / "echo-args.sh")}, ttl=TTL,
        sync_mode="push", tls=True, proxy_protocol=False, haproxy=True,
        extra={"drain_wait": str(DRAIN)},
    )  # fmt: skip
    c: Cluster | None = None
    try:
        with running_cluster(tmp_path_factory.mktemp("hasync"), spec) as c:
            c.one_leader()
            c.converged()
            yield c
    finally:
        if MEASURED:
            print("\nHA sync measurements:", json.dumps(MEASURED))
    assert c is not None and all(code == 0 for code in c.exit_codes.values()), c and c.exit_codes


def manifest(inst: Inst) -> dict[str, str]:
    """``{logical path: sha256}`` of every synced file of ``inst``."""
    layout = Layout(load_config(str(inst.config)))
    return {p: e.sha256 for p, e in Scanner(layout).scan().items()}


# ----- generations --------------------------------------------------------------------------


def test_every_instance_runs_the_published_generation(cluster: Cluster) -> None:
    leader = cluster.one_leader()
    g = cluster.converged()
    assert g.leader == leader.id and g.epoch == leader.status()["epoch"]
    # secrets never go into the store: only hashes of the files
    raw = cluster.published().to_json()
    for secret in ("ca.key", "dispatcher.key"):
        assert f"ca/{secret}" in g.files
        assert (leader.ca_dir / secret).read_text() not in raw
    assert "BEGIN" not in raw
    want = manifest(leader)
    assert want == {p: e.sha256 for p, e in g.files.items()}
    for inst in cluster.running():
        st = inst.status()
        assert st["generation"] == g.number and st["sync_mode"] == "push"
        assert st["cert_serial"] == cluster.dispatcher.serial_hex and not st["restart_pending"]
        assert manifest(inst) == want, inst.name
    p = cluster.ced(leader, "cluster", "status", "--json")
    doc = json.loads(p.stdout)
    assert doc["generation"] == g.number
    assert {m["generation"] for m in doc["members"]} == {g.number}


def _fetch(cluster: Cluster, inst: Inst, path: str, generation: int,
           cert: Issued | None) -> httpx.Response:  # fmt: skip
    """``GET /cluster/files/PATH`` of ``inst``, presenting ``cert`` (or no certificate)."""
    ctx = client_ssl(cluster.ca_cert, cert)
    with httpx.Client(verify=ctx, trust_env=False, timeout=5) as c:
        return c.get(f"{inst.url}/cluster/files/{path}", params={"generation": generation})


def test_peer_file_route_needs_the_dispatcher_certificate(cluster: Cluster) -> None:
    leader = cluster.one_leader()
    g = cluster.published()
    # an operator (no client certificate, auth hook "allow") gets nothing
    r = _fetch(cluster, leader, "ca/ca.key", g.number, None)
    assert r.status_code == 403 and "dispatcher certificate" in r.json()["detail"]
    # a certificate of the same CA that is not the dispatcher's: an agent's
    agent = cluster.agents["web1"].agent_cert
    r = _fetch(cluster, leader, "ca/ca.key", g.number, agent)
    assert r.status_code == 403
    assert "ACTION=peer-denied" in leader.logtext()
    # the dispatcher certificate: the file, which matches the manifest
    r = _fetch(cluster, leader, "ca/ca.crt", g.number, cluster.dispatcher)
    assert r.status_code == 200, r.text
    assert hashlib.sha256(r.content).hexdigest() == g.files["ca/ca.crt"].sha256
    r = _fetch(cluster, leader, "ca/ca.crt", g.number - 1, cluster.dispatcher)
    assert r.status_code == 409
    r = _fetch(cluster, leader, "ca/../../etc/passwd", g.number, cluster.dispatcher)
    assert r.status_code in (404, 409)


# ----- certificate rotation under load ---------------------------------------------------------


def _served_serial(port: int, cluster: Cluster) -> str:
    return format(served_serial(port, cluster.verify()), "x")


def test_rotation_under_load_through_haproxy(cluster: Cluster) -> None:
    old = cluster.dispatcher.serial_hex
    follower = cluster.followers()[0]
    load = cluster.load(kinds=("ping",)).start()  # POST /ping of both agents through HAProxy
    try:
        load.wait_requests(6, timeout=30)  # served before the rotation starts
        rep = load.report()
        assert rep.requests >= 6 and not rep.failures, rep.describe()
        t0 = time.monotonic()
        # from a follower's host: the leader carries it out
        p = cluster.ced(follower, "rotate-cert", "--json", "--yes", timeout=200)
        took = time.monotonic() - t0
        assert p.returncode == 0, p.stdout + p.stderr
        doc = json.loads(p.stdout)
        new = doc["new_serial"]
        assert doc["ok"] == 1 and doc["old_serial"] == old and new != old
        assert doc["cluster"]["converged"] is True
        rotated_by = cluster.insts[doc["leader"][-1]]
        assert rotated_by is not follower
        MEASURED["rotation_cli_s"] = round(took, 2)

        def retired() -> bool:
            lead = cluster.one_leader()
            state = json.loads((lead.state / "rotation.json").read_text())
            return "previous_serial" not in state and state["current_serial"] == new

        wait_until(retired, 30, "the old serial to be retired")
        MEASURED["rotation_end_to_end_s"] = round(time.monotonic() - t0, 2)
        cluster.converged()
        time.sleep(1.0)  # the load keeps going on the retired state
    finally:
        rep = load.stop()
    MEASURED["load_requests"] = rep.requests
    MEASURED["load_first_attempt_failures"] = len(rep.first_failures)
    MEASURED["load_failures"] = len(rep.failures)
    if rep.first_failures:
        MEASURED["first_failure_examples"] = [o.first_error for o in rep.first_failures[:3]]
    assert not rep.failures, rep.describe()
    assert rep.requests > 50

    # every instance presents the new serial: /status, its API port, and through HAProxy
    for inst in cluster.insts.values():
        st = inst.status()
        assert st["cert_serial"] == new and not st["restart_pending"], (inst.name, st)
        assert _served_serial(inst.api_port, cluster) == new
        assert "ACTION=restart-exec" in inst.logtext(), inst.name
        assert json.loads((inst.state / "rotation.json").read_text())["current_serial"] == new
    assert _served_serial(cluster.haproxy.api_port, cluster) == new
    leader = cluster.one_leader()
    want = manifest(leader)
    assert "ca/dispatcher.crt.prev" not in want  # the kept old pair is gone after retirement
    for inst in cluster.insts.values():
        assert manifest(inst) == want, inst.name

    # agents trust only the new serial now
    new_cert = Issued(
        leader.ca_dir / "dispatcher.crt", leader.ca_dir / "dispatcher.key", int(new, 16)
    )
    for agent in cluster.agents.values():
        resp = agent.call("POST", "/ping", {}, cluster.dispatcher)
        assert resp.code == 403 and resp.json()["error"] == "serial mismatch"
        assert agent.call("POST", "/ping", {}, new_cert).code == 200
    # only the leader that rotated signed anything; no follower ever did
    for inst in cluster.insts.values():
        signed = [ln for ln in inst.logtext().splitlines() if "ACTION=ca-sign " in ln]
        if inst is rotated_by:
            assert signed and all("dispatcher" in ln for ln in signed)
        else:
            assert not signed, (inst.name, signed)


# ----- a follower killed during sync, a follower down during a generation ----------------------


def _out_of_band(leader: Inst, count: int, size: int) -> None:
    """Files in the leader's ca_dir written by hand (the leader's rescan publishes them)."""
    bundle = leader.ca_dir / "bundle"
    bundle.mkdir(exist_ok=True)
    for i in range(count):
        tmp = bundle / f".part-{i:04d}.tmp"
        tmp.write_bytes(secrets.token_bytes(size))
        os.replace(tmp, bundle / f"part-{i:04d}.bin")


def test_follower_killed_during_sync_converges(cluster: Cluster) -> None:
    leader = cluster.one_leader()
    victim = cluster.followers()[0]
    before = cluster.converged()
    before_files = manifest(victim)
    assert victim.stop() == 0
    _out_of_band(leader, 600, 4096)
    g = wait_until(lambda: (x := cluster.published()).number > before.number
                   and len([p for p in x.files if p.startswith("ca/bundle/")]) == 600 and x,
                   15, "the leader to publish the new files")  # fmt: skip
    stage = victim.ca_dir / "bundle" / ".ctrl-exec-sync"  # next to the targets: same filesystem
    victim.start()
    staged = wait_until(lambda: stage.is_dir() and len(os.listdir(stage)) >= 30 and stage,
                        30, "the follower to stage files", step=0.002)  # fmt: skip
    assert victim.proc is not None
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(5)
    n_staged = len(os.listdir(staged))
    assert n_staged < 600, "the sync finished before the kill"
    # no partial file: every live file is the old or the new version, whole
    live = manifest(victim)
    for path, sha in live.items():
        assert sha == before_files.get(path) or sha == g.files[path].sha256, path
    swapped = [p.name for p in (victim.ca_dir / "bundle").iterdir() if not p.name.startswith(".")]
    assert swapped == []  # nothing is swapped in before every file is staged
    applied = json.loads((victim.state / "sync" / "applied.json").read_text())
    assert applied["generation"] < g.number
    t0 = time.monotonic()
    victim.start()
    victim.wait_healthy(30, "/ready")
    wait_until(lambda: victim.status()["generation"] >= g.number, 30, "the victim to converge")
    MEASURED["killed_follower_converged_s"] = round(time.monotonic() - t0, 2)
    MEASURED["killed_after_staged_files"] = n_staged
    assert not stage.exists()
    assert manifest(victim) == manifest(cluster.one_leader())
    assert "ACTION=sync-stage-cleanup" in victim.logtext()


def test_follower_down_during_a_generation_catches_up(cluster: Cluster) -> None:
    leader = cluster.one_leader()
    other = cluster.followers()[-1]
    before = cluster.converged().number
    assert other.stop() == 0
    shutil.rmtree(leader.ca_dir / "bundle")  # removed by hand on the leader: published too
    g = wait_until(lambda: (x := cluster.published()).number > before
                   and not any(p.startswith("ca/bundle/") for p in x.files) and x,
                   15, "a generation without the bundle")  # fmt: skip
    assert (other.ca_dir / "bundle").is_dir()
    other.start()
    other.wait_healthy(30, "/ready")
    assert other.status()["generation"] >= g.number  # /ready waited for the first sync
    assert not (other.ca_dir / "bundle").exists()
    assert manifest(other) == manifest(leader)
    cluster.converged()


def test_generation_and_order_from_an_old_epoch_are_refused(cluster: Cluster) -> None:
    leader = cluster.one_leader()
    followers = cluster.followers()
    current = cluster.converged()
    assert current.epoch > 1
    # a forged generation from epoch 1 that would delete an agent's registry record
    files = {p: e for p, e in current.files.items() if p != "registry/web1.json"}
    stale = Generation(current.number + 1, 1, "nobody", manifest_hash(files), files,
                       time.time())  # fmt: skip
    order = {"order": "restart", "id": "forged", "epoch": 1, "generation": current.number,
             "leader": "nobody"}  # fmt: skip
    pids = {i.name: i.proc.pid for i in followers if i.proc is not None}
    b = cluster.backend()
    try:
        # unfenced, sealed with the cluster key (an old leader's records): only a test can
        gkey, okey = b.keys.generation, b.keys.order(followers[0].id)
        head, chunks = encode_generation(stale)
        for sha, data in chunks.items():
            b.put_value(b.keys.generation_chunk(sha), data)
        b.put_value(gkey, cluster.signer.seal("generation", gkey, json.loads(head)))
        b.put_value(okey, cluster.signer.seal("order", okey, order))
    finally:
        b.close()
    for inst in followers:
        wait_until(lambda i=inst: "ACTION=sync-refused" in i.logtext()
                   and f"GENERATION={stale.number}" in i.logtext(), 10, "the refusal")  # fmt: skip
        assert (inst.registry_dir / "web1.json").exists()
    wait_until(lambda: "ACTION=order-refused" in followers[0].logtext(), 10, "order refused")
    # the leader notices the store does not hold its generation and publishes again
    g = cluster.converged()
    assert g.epoch == leader.status()["epoch"] and "registry/web1.json" in g.files
    assert {i.name: i.proc.pid for i in followers if i.proc is not None} == pids
    for inst in followers:
        assert manifest(inst) == manifest(leader)
        st = inst.status()
        assert not st["draining"] and st["generation"] == g.number


# ----- pairing decisions from any instance's CLI ---------------------------------------------


def test_pairing_decided_from_a_follower_cli_by_the_leader(cluster: Cluster) -> None:
    leader = cluster.one_leader()
    follower = cluster.followers()[0]
    queue = leader.state / "pairing"
    one = pq.submit(queue, hostname="paired-1", csr=make_csr("paired-1"), nonce="n-1",
                    source_ip="127.0.0.9", writer=LocalWriter())  # fmt: skip
    two = pq.submit(queue, hostname="paired-2", csr=make_csr("paired-2"), nonce="n-2",
                    source_ip="127.0.0.9", writer=LocalWriter())  # fmt: skip
    p = cluster.ced(follower, "list-requests", "--json")
    assert p.returncode == 0, p.stderr
    assert {r["id"] for r in json.loads(p.stdout)["requests"]} >= {one["id"], two["id"]}
    p = cluster.ced(follower, "approve", one["id"], "--lookup-by", "ip", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(p.stdout)
    assert doc["ok"] == 1 and doc["hostname"] == "paired-1" and doc["leader"] == leader.id
    p = cluster.ced(follower, "deny", two["id"], "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["leader"] == leader.id, p.stderr
    p = cluster.ced(follower, "approve", two["id"])
    assert p.returncode == 1 and "no pending request" in (p.stdout + p.stderr).lower()
    # the leader wrote the record; every follower got it through a generation
    record = leader.registry_dir / "paired-1.json"
    assert record.exists() and not (follower.state / "pairing" / f"{one['id']}.json").exists()
    cluster.converged()
    sha = hashlib.sha256(record.read_bytes()).hexdigest()
    for inst in cluster.running():
        assert hashlib.sha256((inst.registry_dir / "paired-1.json").read_bytes()).hexdigest() == sha
    # the leader signed; no follower did
    assert "CN=paired-1" in leader.logtext()
    for inst in cluster.followers():
        assert "CN=paired-1" not in inst.logtext(), inst.name
