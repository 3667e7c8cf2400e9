"""An etcd writer alters a manifest chunk of the published generation.

The head is sealed with the cluster key and names each chunk by its sha256; the chunks
themselves are not sealed. An attacker who can write to etcd (no cluster key) replaces a
chunk with one that makes ``ca/ca.key`` mode 4777. A follower that must read the chunk
(restarted: no chunk cached) refuses the generation (hash check), changes no file and
stays out of service (``/ready`` 503); the leader rewrites the chunk within its check
period and the follower converges. Prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.lab.etcd import ETCD, SKIP_REASON
from ops.lab.hacluster import Cluster, ClusterSpec, get, running_cluster, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(ETCD is None, reason=SKIP_REASON),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    spec = ClusterSpec(agents={}, scripts={}, ttl=2, sync_mode="push", tls=True,
                       proxy_protocol=False, haproxy=False, extra={"drain_wait": "0.5"})  # fmt: skip
    with running_cluster(tmp_path_factory.mktemp("chunkattack"), spec) as c:
        c.one_leader()
        c.converged()
        yield c


def snapshot(*dirs: Path) -> str:
    h = hashlib.sha256()
    for top in dirs:
        for p in sorted(top.rglob("*")):
            st = p.lstat()
            h.update(f"{p.relative_to(top)}\0{st.st_mode:o}\0{st.st_mtime_ns}\0".encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def test_an_altered_chunk_changes_no_file_and_is_rewritten(cluster: Cluster) -> None:
    before_g = cluster.converged()
    victim = cluster.followers()[0]
    before = snapshot(victim.ca_dir, victim.registry_dir)
    assert victim.stop() == 0
    # a genuine change the victim has not applied yet: it must read the new chunks
    leader = cluster.one_leader()
    (leader.ca_dir / "genuine-change.txt").write_text("published while the victim was down\n")
    g = wait_until(lambda: (x := cluster.published()).number > before_g.number
                   and "ca/genuine-change.txt" in x.files and x, 20, "the new generation")  # fmt: skip
    b = cluster.backend(2.0)
    try:
        forged_key = ""
        for kv in b.get_prefix(b.keys.generation_chunks):
            rows = json.loads(zlib.decompress(kv.value))
            for row in rows:
                if row[0] == "ca/ca.key":
                    row[1] = 0o4777
                    forged_key = kv.key
                    b.put_value(kv.key, zlib.compress(json.dumps(rows).encode()))
        assert forged_key, "no chunk lists ca/ca.key"
    finally:
        b.close()
    victim.start()
    wait_until(lambda: "fails its hash check" in victim.logtext(), 30, "the refusal")

    def out_of_sync() -> bool:  # "starting" first on a slow machine, then "not in sync"
        code, body = get(f"{victim.health_url}/ready", 2)
        assert code != 200, f"the victim is ready with a forged chunk: {body}"
        return code == 503 and "not in sync" in str(body.get("reason"))

    wait_until(out_of_sync, 30, "/ready to say not in sync")
    assert snapshot(victim.ca_dir, victim.registry_dir) == before  # nothing changed
    assert (victim.ca_dir / "ca.key").stat().st_mode & 0o7777 == 0o600
    assert not (victim.ca_dir / "genuine-change.txt").exists()
    # the leader notices (every 30 s) and writes the genuine chunk again
    leader = cluster.one_leader()
    wait_until(lambda: "ACTION=generation-repair" in leader.logtext(), 60, "the repair")
    wait_until(lambda: get(f"{victim.health_url}/ready", 2)[0] == 200, 30, "the victim ready")
    assert victim.status()["generation"] >= g.number
    assert (victim.ca_dir / "ca.key").stat().st_mode & 0o7777 == 0o600
    assert (victim.ca_dir / "genuine-change.txt").exists()
    (leader.ca_dir / "genuine-change.txt").unlink()
    cluster.converged(30)
    print(
        f"\n[attack] altered manifest chunk (ca.key 4777): refused (hash check failed on "
        f"{victim.name}: no file changed, /ready 503 until the leader rewrote the chunk)"
    )
