"""Pushes of a generation (``POST /cluster/files/``) that are not the leader's.

The leader pushes each new generation's head, chunks and changed files to the followers
(:mod:`dispatcher.ha.sync.push`). A push is taken only from a dispatcher certificate of
the cluster, only when its head is byte for byte the head etcd holds now (sealed with the
cluster key), and a pushed file only when it is the manifest's. Each attack below must
be refused and leave every synced file of the target as it was. Positive control first:
a genuine change reaches the followers by the push. Prints ``[attack] <name>: refused
(<detail>)``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.common import certs
from dispatcher.pairing import queue as pq
from dispatcher.pki import ca as pki
from dispatcher.statewrite import LocalWriter
from ops.lab.etcd import ETCD, SKIP_REASON
from ops.lab.hacluster import Cluster, ClusterSpec, Inst, running_cluster, wait_until
from ops.lab.net import client_ssl
from ops.lab.pki import Issued
from tests.support.attacks import attack, show_attacks  # noqa: F401

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(ETCD is None, reason=SKIP_REASON),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    spec = ClusterSpec(agents={}, scripts={}, ttl=2, sync_mode="push", tls=True,
                       proxy_protocol=False, haproxy=False,
                       extra={"drain_wait": "0.5", "sync_ack": "majority"})  # fmt: skip
    with running_cluster(tmp_path_factory.mktemp("pushattack"), spec) as c:
        c.one_leader()
        c.converged()
        yield c


def snapshot(inst: Inst) -> str:
    """Every synced file of ``inst`` (path, mode, content)."""
    h = hashlib.sha256()
    for top in (inst.ca_dir, inst.registry_dir):
        for p in sorted(top.rglob("*")):
            if ".ctrl-exec-sync" in p.parts or not p.is_file():
                continue
            h.update(f"{p.relative_to(top)}\0{p.stat().st_mode:o}\0".encode() + p.read_bytes())
    return h.hexdigest()


def push(cluster: Cluster, inst: Inst, body: bytes, cert: Issued | None) -> httpx.Response:
    ctx: ssl.SSLContext = client_ssl(cluster.ca_cert, cert)
    with httpx.Client(verify=ctx, trust_env=False, timeout=10) as c:
        return c.post(f"{inst.url}/cluster/files/", content=body,
                      headers={"Content-Type": "application/json"})  # fmt: skip


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def approve(cluster: Cluster, name: str) -> int:
    """A genuine change: the leader approves a pairing request; the generation carrying it."""
    leader = cluster.one_leader()
    csr = certs.make_csr(certs.new_key("ec-p256"), name)
    rec = pq.submit(leader.state / "pairing", hostname=name, csr=csr, nonce="ab" * 16,
                    source_ip="127.0.1.9", writer=LocalWriter())  # fmt: skip
    with cluster.client(leader) as c:
        r = c.post(f"/pairing/{rec['id']}/approve", json={"lookup_by": "ip"})
    assert r.status_code == 200, r.text
    return int(leader.status()["generation"])


def agent_cert(cluster: Cluster, tmp: Path) -> Issued:
    """A certificate of the dispatcher CA that is not a dispatcher's (an agent's)."""
    ca = pki.load_ca(cluster.insts["a"].ca_dir)
    key = certs.new_key("ec-p256")
    pem = pki.sign_csr(ca, certs.make_csr(key, "agent.example"))
    (tmp / "agent.crt").write_text(pem)
    (tmp / "agent.key").write_bytes(certs.key_pem(key))
    serial = int(pki.cert_serial_hex(str(tmp / "agent.crt")), 16)
    return Issued(tmp / "agent.crt", tmp / "agent.key", serial)


def applied_line(inst: Inst, generation: int) -> str | None:
    """The ``sync-applied`` line of ``generation`` in ``inst``'s log, once there."""
    return next((ln for ln in inst.logtext().splitlines()
                 if "ACTION=sync-applied" in ln and f" GENERATION={generation} " in ln), None)  # fmt: skip


def test_a_genuine_change_reaches_the_followers_by_the_push(cluster: Cluster) -> None:
    """Every follower receives each change by the push; a follower whose watch brought the
    head first may still fetch (the first push also opens the connection), so of three
    changes at least one is applied from the pushed files."""
    sources: list[str] = []
    for i in range(3):
        generation = approve(cluster, f"pushed{i}.example")
        for f in cluster.followers():
            line = wait_until(lambda f=f, g=generation: applied_line(f, g), 20, "applied")
            sources.append(line.split("SOURCE=")[1].split()[0])
    for f in cluster.followers():
        assert f.logtext().count("METHOD=POST PATH=/cluster/files/ ") >= 3, f.name
    assert "push" in sources, sources
    assert "ACTION=sync-push" not in cluster.one_leader().logtext()  # no push failed


def test_pushes_that_are_not_the_leaders_change_nothing(cluster: Cluster, tmp_path: Path) -> None:
    old = cluster.published()
    b = cluster.backend(2.0)
    try:
        old_head = b.get_value(b.keys.generation)
        assert old_head is not None
        approve(cluster, "newer.example")
        cluster.converged()
        head = b.get_value(b.keys.generation)
        assert head is not None and head != old_head
        rev = b.revision()
    finally:
        b.close()
    victim = cluster.followers()[0]
    before = snapshot(victim)
    g = cluster.published()
    reg = next(p for p in g.files if p.startswith("registry/"))
    forged_files = {reg: b64(b'{"hostname": "evil", "ip": "10.6.6.6"}\n'),
                    "ca/ca.crt": b64(b"-----BEGIN CERTIFICATE-----\nforged\n")}  # fmt: skip

    # 1. the route with a certificate of the same CA that is no dispatcher's
    body = json.dumps({"head": b64(head), "rev": rev, "chunks": {}, "files": forged_files})
    r = push(cluster, victim, body.encode(), agent_cert(cluster, tmp_path))
    assert r.status_code == 403, r.text
    attack("push-with-agent-cert", f"HTTP {r.status_code}: {r.json()['detail']}")
    r = push(cluster, victim, body.encode(), None)
    assert r.status_code == 403, r.text
    attack("push-without-cert", f"HTTP {r.status_code}")

    # 2. a replayed genuine head of an earlier generation, with forged files
    body = json.dumps({"head": b64(old_head), "rev": rev, "chunks": {}, "files": forged_files})
    r = push(cluster, victim, body.encode(), cluster.dispatcher)
    assert r.status_code == 409 and "not the generation head" in r.text, r.text
    attack("push-replayed-head", f"generation {old.number}: {r.json()['detail']}")

    # 3. the current head with forged files: the files are not the manifest's
    body = json.dumps({"head": b64(head), "rev": rev, "chunks": {}, "files": forged_files})
    r = push(cluster, victim, body.encode(), cluster.dispatcher)
    assert r.status_code in (200, 409), r.text  # it runs that generation already, or refuses
    assert victim.status()["generation"] == g.number
    attack("push-forged-files", f"HTTP {r.status_code}, files unchanged")

    # 4. a head that is not sealed with the cluster key (an etcd writer's)
    doc = json.loads(head)
    doc["body"]["generation"] = g.number + 100
    body = json.dumps({"head": b64(json.dumps(doc).encode()), "rev": rev, "files": forged_files})
    r = push(cluster, victim, body.encode(), cluster.dispatcher)
    assert r.status_code == 409, r.text
    attack("push-unsealed-head", f"HTTP {r.status_code}: {r.json()['detail']}")

    # 5. malformed documents
    for bad in (b"[]", b'{"head": "!!", "rev": 1}', b'{"head": "aGk=", "rev": "1"}'):
        r = push(cluster, victim, bad, cluster.dispatcher)
        assert r.status_code in (400, 409), (bad, r.text)
    attack("push-malformed", "HTTP 409 for each")

    assert snapshot(victim) == before
    assert cluster.converged().number == g.number  # nobody moved
