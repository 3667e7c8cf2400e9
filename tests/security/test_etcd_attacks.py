"""Attacks by an etcd writer: whoever can write to the store may delay, never make an
instance act.

One live push-mode cluster (real etcd, three ``ctrl-exec-api`` over TLS, a real agent).
The attacker is an etcd client (:class:`cluster.backend.EtcdBackend`) without the cluster
key, holding at most an agent certificate of the cluster's CA. Before and after each
refused attack every instance's CA directory and registry are hashed (names, modes,
mtimes, contents); each refusal prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.signing import RecordSigner
from dispatcher.ha.manifest import Generation, manifest_hash
from dispatcher.ha.sync.push import Pusher
from dispatcher.pairing import queue as pq
from dispatcher.statewrite import LocalWriter
from ops.lab.etcd import ETCD, SKIP_REASON
from ops.lab.hacluster import Cluster, ClusterSpec, Inst, make_csr, running_cluster, wait_until
from ops.lab.pki import Issued

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(ETCD is None, reason=SKIP_REASON),
]

TTL = 2
FORGER = RecordSigner(b"\x66" * 32)  # the attacker's own key: not the cluster's


# ----- helpers -------------------------------------------------------------------------------


def snapshot(*dirs: Path) -> str:
    """One hash over every entry below ``dirs``: relative name, mode, mtime and content."""
    h = hashlib.sha256()
    for top in dirs:
        h.update(f"\0{top}\0".encode())
        for p in sorted(top.rglob("*")):
            st = p.lstat()
            h.update(f"{p.relative_to(top)}\0{st.st_mode:o}\0{st.st_mtime_ns}\0".encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def state(cluster: Cluster) -> dict[str, str]:
    return {i.name: snapshot(i.ca_dir, i.registry_dir) for i in cluster.insts.values()}


def attack(name: str, detail: str) -> None:
    print(f"[attack] {name}: refused ({detail})")


def logged(inst: Inst, *parts: str) -> bool:
    return any(all(p in ln for p in parts) for ln in inst.logtext().splitlines())


def rejected_metric(cluster: Cluster, inst: Inst, kind: str) -> float:
    with cluster.client(inst, timeout=10) as c:
        text = c.get("/metrics").text
    for ln in text.splitlines():
        if ln.startswith(f'ctrl_exec_records_rejected_total{{kind="{kind}"}}'):
            return float(ln.split()[-1])
    return 0.0


@pytest.fixture(autouse=True)
def _show_attacks(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    yield
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[attack]")]
    if lines:
        with capsys.disabled():
            print("", *lines, sep="\n")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, script_dir: Path) -> Iterator[Cluster]:
    spec = ClusterSpec(agents={"web1": "127.0.0.2"},
                       scripts={"echo-args": str(script_dir / "echo-args.sh")}, ttl=TTL,
                       sync_mode="push", tls=True, proxy_protocol=False)  # fmt: skip
    with running_cluster(tmp_path_factory.mktemp("etcdattack"), spec) as c:
        c.one_leader()
        c.converged()
        yield c


@pytest.fixture
def steady(cluster: Cluster) -> Cluster:
    """The cluster settled: one leader, every instance on the published generation."""
    cluster.ensure_all_running()
    cluster.one_leader()
    cluster.converged()
    return cluster


def genuine_change(cluster: Cluster, leader: Inst, name: str) -> None:
    """A file edited by hand on the leader: published, and replicated to every follower."""
    (leader.ca_dir / name).write_text(f"{name} {time.time()}\n")
    g = cluster.converged(30)
    assert f"ca/{name}" in g.files
    for inst in cluster.running():
        assert (inst.ca_dir / name).read_bytes() == (leader.ca_dir / name).read_bytes()


# ----- requests for the leader ------------------------------------------------------------------


def test_forged_requests_never_approve_a_pairing(steady: Cluster) -> None:
    cluster = steady
    leader = cluster.one_leader()
    pending = pq.submit(leader.state / "pairing", hostname="intruder", csr=make_csr("intruder"),
                        nonce="n-x", source_ip="127.0.0.9", writer=LocalWriter())  # fmt: skip
    queued = leader.state / "pairing" / f"{pending['id']}.json"
    assert queued.exists()
    before = state(cluster)
    b = cluster.backend(2.0)
    try:
        keys = []
        for n, how in enumerate(("unsealed", "forged-key", "other-key")):
            rid = f"{int(time.time() * 1000):x}-evil{n}"
            key = b.keys.request(rid)
            doc = {"id": rid, "kind": "approve", "at": time.time(), "requested_by": "attacker",
                   "args": {"reqid": pending["id"], "lookup_by": "ip"}}  # fmt: skip
            if how == "unsealed":
                value = json.dumps(doc)
            elif how == "forged-key":
                value = FORGER.seal("request", key, doc)
            else:  # sealed with the cluster key, but for another request key: moved
                value = cluster.signer.seal("request", b.keys.request("someone-else"), doc)
            b.put_value(key, value)
            keys.append(key)
        wait_until(lambda: all(b.get_value(k) is None for k in keys), 15, "forged requests dropped")
        results = [kv.key for kv in b.get_prefix(b.keys.results)]
    finally:
        b.close()
    assert not results, results
    for k in keys:
        assert logged(leader, "ACTION=request-drop", f"KEY={k} "), k
    assert queued.exists() and not (leader.registry_dir / "intruder.json").exists()
    assert "CN=intruder" not in leader.logtext()
    assert state(cluster) == before
    assert rejected_metric(cluster, leader, "request") >= 3
    attack("forged request approving a pairing", "3 records not sealed with the cluster key "
           "dropped; the request stays pending, nothing signed or registered")  # fmt: skip


def test_request_ids_with_a_slash_are_dropped(steady: Cluster) -> None:
    cluster = steady
    leader = cluster.one_leader()
    before = state(cluster)
    b = cluster.backend(2.0)
    try:
        gen_before = b.get_kv(b.keys.generation)
        keys = [b.keys.requests + rid for rid in ("a/../../generation", "x/y", "../orders/z")]
        for k in keys:
            doc = {"id": k.rsplit("/", 1)[-1], "kind": "list-requests", "args": {},
                   "at": time.time()}  # fmt: skip
            b.put_value(k, FORGER.seal("request", k, doc))
        wait_until(lambda: all(b.get_value(k) is None for k in keys), 15, "dropped")
        assert not b.get_prefix(b.keys.results)
        gen_after = b.get_kv(b.keys.generation)
    finally:
        b.close()
    assert gen_before is not None and gen_after is not None
    for k in keys:
        assert logged(leader, "ACTION=request-drop", f"KEY={k} "), k
    assert state(cluster) == before
    attack("request ids with '/'", f"{len(keys)} keys dropped, no result written")


# ----- generations ---------------------------------------------------------------------------


def forged_generation(current: Generation, epoch: int | None = None) -> Generation:
    """``current`` with ``ca/ca.key`` made 4777 and an agent's registry record gone."""
    files = dict(current.files)
    files["ca/ca.key"] = dataclasses.replace(files["ca/ca.key"], mode=0o4777)
    files.pop("registry/web1.json")
    return Generation(current.number + 1000, current.epoch if epoch is None else epoch,
                      current.leader, manifest_hash(files), files, time.time())  # fmt: skip


def test_forged_generation_changes_no_file(steady: Cluster) -> None:
    cluster = steady
    current = cluster.converged()
    followers = cluster.followers()
    before = state(cluster)
    forged = forged_generation(current)
    b = cluster.backend(2.0)
    try:
        key = b.keys.generation
        for value in (
            forged.to_json(),
            FORGER.seal("generation", key, json.loads(forged.to_json())),
        ):
            b.put_value(key, value)
            for inst in followers:
                wait_until(lambda i=inst: logged(i, "ACTION=record-rejected", "KIND=generation"),
                           10, f"{inst.name} rejects the forged generation")  # fmt: skip
    finally:
        b.close()
    g = cluster.converged(20)  # the leader sees the store changed and publishes again
    assert g.number < forged.number and g.files["ca/ca.key"].mode == 0o600
    assert state(cluster) == before
    for inst in cluster.running():
        assert (inst.ca_dir / "ca.key").stat().st_mode & 0o7777 == 0o600
        assert (inst.registry_dir / "web1.json").exists()
    assert all(rejected_metric(cluster, i, "generation") >= 1 for i in followers)
    attack("forged generation (chmod 4777 ca.key, delete a registry file)",
           "unsigned and wrongly sealed records ignored by every follower; no file changed")  # fmt: skip


def test_forged_huge_epoch_blocks_no_genuine_generation(steady: Cluster) -> None:
    cluster = steady
    leader = cluster.one_leader()
    current = cluster.converged()
    forged = forged_generation(current, epoch=10**12)
    b = cluster.backend(2.0)
    try:
        key = b.keys.generation
        b.put_value(key, FORGER.seal("generation", key, json.loads(forged.to_json())))
    finally:
        b.close()
    for inst in cluster.followers():
        wait_until(lambda i=inst: logged(i, "ACTION=record-rejected", "KIND=generation"),
                   10, "rejected")  # fmt: skip
    genuine_change(cluster, leader, "after-epoch-attack.txt")  # still replicates
    for inst in cluster.running():
        assert inst.status()["epoch"] < 10**6
    (leader.ca_dir / "after-epoch-attack.txt").unlink()
    cluster.converged(30)
    attack("forged generation with epoch 10^12",
           "ignored (bad MAC); the next genuine generation replicated to every follower")  # fmt: skip


# ----- restart orders ------------------------------------------------------------------------


def test_forged_restart_order_restarts_nobody(steady: Cluster) -> None:
    cluster = steady
    leader = cluster.one_leader()
    followers = cluster.followers()
    current = cluster.converged()
    pids = {i.name: i.proc.pid for i in cluster.running() if i.proc is not None}
    epoch = int(leader.status()["epoch"])
    b = cluster.backend(2.0)
    try:
        keys = []
        for inst, value in zip(followers, ("unsealed", "forged"), strict=False):
            key = b.keys.order(inst.id)
            doc = {"order": "restart", "id": f"evil-{inst.name}", "epoch": epoch,
                   "generation": current.number, "leader": leader.id}  # fmt: skip
            b.put_value(key, json.dumps(doc) if value == "unsealed"
                        else FORGER.seal("order", key, doc))  # fmt: skip
            keys.append(key)
        wait_until(lambda: all(b.get_value(k) is None for k in keys), 10, "orders deleted")
    finally:
        b.close()
    for inst in followers:
        assert logged(inst, "ACTION=record-rejected", "KIND=order"), inst.name
        assert not logged(inst, "ACTION=restart-ordered"), inst.name
    time.sleep(1.0)
    assert {i.name: i.proc.pid for i in cluster.running() if i.proc is not None} == pids
    assert all(not i.status()["draining"] for i in cluster.running())
    attack("forged restart order", "deleted by the follower, never acted on; no process restarted")


# ----- switchover and pause records ------------------------------------------------------------


def test_forged_switchover_and_pause_records_are_ignored(steady: Cluster) -> None:
    cluster = steady
    leader = cluster.one_leader()
    b = cluster.backend(2.0)
    try:
        info = b.leader()
        assert info is not None and info.instance_id == leader.id
        doc = {"epoch": info.epoch, "leader": info.instance_id, "to": "", "at": time.time(),
               "requested_by": "attacker"}  # fmt: skip
        b.put_value(b.keys.switchover, json.dumps(doc))
        wait_until(lambda: b.get_value(b.keys.switchover) is None, 10, "switchover deleted")
        key = b.keys.paused
        b.put_value(key, FORGER.seal("paused", key, {"by": "attacker", "reason": "x",
                                                     "at": time.time()}))  # fmt: skip
        for inst in cluster.running():
            wait_until(lambda i=inst: logged(i, "ACTION=record-rejected", "KIND=paused"), 10,
                       f"{inst.name} ignores the pause")  # fmt: skip
        time.sleep(2 * TTL)
        assert b.leader() == info  # nobody resigned
        b.delete_value(key)
    finally:
        b.close()
    assert logged(leader, "ACTION=record-rejected", "KIND=switchover")
    assert not logged(leader, "ACTION=leader-resign", "REASON=switchover")
    for inst in cluster.running():
        assert not logged(inst, "ACTION=cluster-paused"), inst.name
    attack("forged switchover and pause records",
           "ignored (not sealed with the cluster key): the leader kept leading, nothing paused")  # fmt: skip


# ----- member records: an impostor behind the leader's advertise_url ------------------------------


class Impostor:
    """A TLS server with an agent certificate of the cluster's CA: records every connection
    and every byte a client sends after the handshake."""

    def __init__(self, cert: Issued, ca: Path) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert.cert, cert.key)
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        self.received = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> Impostor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except OSError:
                continue
            try:
                raw.settimeout(1.0)
                with self.ctx.wrap_socket(raw, server_side=True) as s:
                    self.handshakes += 1
                    for _ in range(64):  # bounded: at most 64 reads of one connection
                        data = s.recv(65536)
                        if not data:
                            break
                        self.received += data
            except OSError:
                pass
            finally:
                raw.close()


def _forge_member(b: Any, leader: Inst, url: str) -> None:
    """Rewrite the leader's member record with ``url``, keeping its lease (so its session
    sees no conflict: only an etcd writer's edit)."""
    key = b.keys.member(leader.id)
    kv = b.get_kv(key)
    assert kv is not None
    doc = json.loads(kv.value)
    doc["advertise_url"] = url
    b.put_value(key, json.dumps(doc), kv.lease)


def test_forged_member_record_gets_no_fetch_no_forward_no_credentials(steady: Cluster) -> None:
    cluster = steady
    leader = cluster.one_leader()
    follower = cluster.followers()[0]
    pending = pq.submit(leader.state / "pairing", hostname="victim", csr=make_csr("victim"),
                        nonce="n-v", source_ip="127.0.0.9", writer=LocalWriter())  # fmt: skip
    before = state(cluster)
    agent = cluster.agents["web1"]
    stop = threading.Event()
    with Impostor(agent.agent_cert, cluster.ca_cert) as evil:
        b = cluster.backend(2.0)

        def forge() -> None:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    _forge_member(b, leader, evil.url)
                except Exception:
                    pass
                stop.wait(0.05)

        forger = threading.Thread(target=forge, daemon=True)
        forger.start()
        try:
            time.sleep(0.3)
            # an operator asks a follower to decide: forwarding must not reach the impostor
            with cluster.client(follower, timeout=30) as c:
                r = c.post(f"/pairing/{pending['id']}/deny",
                           headers={"Authorization": "Bearer s3cret-operator-token"},
                           json={"username": "alice", "token": "s3cret-operator-token"})  # fmt: skip
            assert r.status_code == 503, r.text
            # a genuine change while the record is forged: nobody fetches from the impostor
            # (larger than a push carries, so the follower must fetch it from "the leader")
            big = Pusher.MAX_FILES_BYTES + 64 * 1024
            (leader.ca_dir / "during-member-attack.txt").write_bytes(b"x" * big)
            wait_until(lambda: logged(follower, "ACTION=peer-refused", "PURPOSE=fetch"), 20,
                       "a fetch refused")  # fmt: skip
        finally:
            stop.set()
            forger.join(5)
        assert logged(follower, "ACTION=peer-refused", "PURPOSE=forward")
        assert evil.received == b"", evil.received[:200]
        handshakes = evil.handshakes
        # the record healed by the leader's next update, everything converges again
        (leader.ca_dir / "during-member-attack.txt").unlink()

        def healed() -> bool:
            return any(m.instance_id == leader.id and m.advertise_url != evil.url
                       for m in b.members())  # fmt: skip

        wait_until(healed, 30, "the leader's member record rewritten by the leader")
        b.close()
        cluster.converged(40)
    assert (leader.state / "pairing" / f"{pending['id']}.json").exists()  # still pending
    after = state(cluster)
    assert after[leader.name] == before[leader.name]
    attack("forged member record (agent-cert impostor as the leader)",
           f"{handshakes} TLS handshakes, 0 bytes of HTTP sent: no fetch, no forward, "
           "no Authorization header or token")  # fmt: skip


def test_forwarded_requests_carry_an_assertion_and_no_credentials(steady: Cluster) -> None:
    """A direct request claiming to be forwarded, without a valid assertion, is refused by
    the leader even from a client with an operator certificate; a genuine forward works."""
    cluster = steady
    leader = cluster.one_leader()
    follower = cluster.followers()[0]
    with cluster.client(leader, timeout=30) as c:
        r = c.get("/pairing", headers={"x-ctrl-exec-forwarded-by": "inst-b"})
        assert r.status_code == 403 and "forwarded request refused" in r.text, r.text
        r = c.get("/pairing", headers={"x-ctrl-exec-forwarded-by": "inst-b",
                                       "x-ctrl-exec-assertion": "e30." + "0" * 64})  # fmt: skip
        assert r.status_code == 403, r.text
    with cluster.client(follower, timeout=30) as c:
        r = c.get("/pairing", headers={"Authorization": "Bearer t0ken"})
    assert r.status_code == 200 and r.headers["x-ctrl-exec-served-by"] == leader.id, r.text
    attack("forged forwarding headers", "403 without an assertion sealed with the cluster key")
