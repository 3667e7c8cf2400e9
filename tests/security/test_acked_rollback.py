"""An etcd writer deletes the acknowledged-generation record and the generation head.

The sealed ``/<cluster>/acked`` record tells a new leader that lacks the newest
acknowledged generation to wait for a member that has it instead of publishing its older
files over it. A writer with etcd access but no cluster key cannot forge it, but can
delete it, and the head with it: the new leader would then find nothing to catch up with
and publish its own files, rolling back an approval the operator was told is kept.

Every member keeps the newest acknowledged generation it has seen on its own disk
(``<state_dir>/sync/acked.json``), so the attack fails: on three real instances, an
approval is acknowledged by the leader and one follower while the third cannot apply it
(its CA and registry dirs read-only) but reads the record. The attacker deletes the record
and the head, the leader is killed and the holder stopped: the third, now leader, publishes
nothing (``sync-behind``), its leader-only work waits. Once the holder is back, it is
handed the leadership and publishes a generation that carries the approval; everyone
converges on it. Prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.pairing import queue as pq
from dispatcher.statewrite import LocalWriter
from ops.lab.etcd import ETCD, SKIP_REASON
from ops.lab.faults import Faults, readonly_available
from ops.lab.hacluster import (
    Cluster,
    ClusterSpec,
    get,
    make_csr,
    running_cluster,
    wait_until,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(ETCD is None, reason=SKIP_REASON),
    pytest.mark.skipif(bool(readonly_available()), reason=readonly_available() or "ok"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    spec = ClusterSpec(agents={}, scripts={}, ttl=2, sync_mode="push", tls=True,
                       proxy_protocol=False, haproxy=False,
                       extra={"drain_wait": "0.5", "sync_ack": "majority"})  # fmt: skip
    with running_cluster(tmp_path_factory.mktemp("ackedattack"), spec) as c:
        c.one_leader()
        c.converged()
        yield c


def acked_mark(state: Path) -> int:
    try:
        return int(json.loads((state / "sync" / "acked.json").read_text())["generation"])
    except (OSError, ValueError, KeyError):
        return 0


def test_deleting_the_acked_record_and_the_head_rolls_nothing_back(cluster: Cluster) -> None:
    leader = cluster.one_leader()
    holder, laggard = cluster.followers()
    faults = Faults(cluster)
    with faults, faults.read_only(laggard, state=False):
        req = pq.submit(leader.state / "pairing", hostname="kept-1", csr=make_csr("kept-1"),
                        nonce="n-kept", source_ip="127.0.0.9", writer=LocalWriter())  # fmt: skip
        p = cluster.ced(holder, "approve", req["id"], "--lookup-by", "ip", "--json")
        assert p.returncode == 0, p.stdout + p.stderr
        head = cluster.published()  # the approval's generation (nothing else changes)
        assert "registry/kept-1.json" in head.files
        acked = head.number
        assert (holder.registry_dir / "kept-1.json").exists()  # applied by the holder
        assert not (laggard.registry_dir / "kept-1.json").exists()  # could not apply it
        wait_until(lambda: acked_mark(laggard.state) >= acked, 10, "the laggard's mark")
        assert laggard.status()["generation"] < acked
        # the holder is down, the leader dies: the laggard is the only one left; the
        # attacker deletes the record and the head (a live leader would republish it)
        holder.stop()
        leader.signal(signal.SIGKILL)
        wait_until(lambda: not leader.alive, 10, "the leader gone")
        b = cluster.backend(2.0)
        try:
            b.delete_value(f"{b.keys.prefix}acked")
            b.delete_value(b.keys.generation)
            assert b.get_value(b.keys.generation) is None
        finally:
            b.close()
    # its disk is writable again: what keeps it from publishing is the rule alone
    wait_until(lambda: cluster.leaders() == [laggard], 20, "the laggard leading")
    deadline = time.monotonic() + 3 * cluster.ttl + 4  # past its catch-up limit
    b = cluster.backend(2.0)
    try:
        while time.monotonic() < deadline:
            assert b.get_value(b.keys.generation) is None, "the laggard published its files"
            time.sleep(0.25)
    finally:
        b.close()
    assert "sync-behind" in laggard.logtext()
    assert not (laggard.registry_dir / "kept-1.json").exists()
    code, body = get(f"{laggard.health_url}/ready", 2)  # leader-only work waits, says why
    assert code == 503 and f"lacks generation {acked}" in str(body.get("reason")), body
    # the holder comes back: it is handed the leadership and republishes the approval
    holder.start()
    wait_until(lambda: cluster.leaders() == [holder], 40, "the holder leading")
    leader.start()
    g = cluster.converged(60)
    assert g.number > acked and "registry/kept-1.json" in g.files
    for inst in cluster.running():
        assert (inst.registry_dir / "kept-1.json").exists(), inst.name
    print(
        f"\n[attack] acked record and generation head deleted, leader killed: refused "
        f"({laggard.name} led without generation {acked} and published nothing (sync-behind); "
        f"{holder.name}, which applied it, took over and published generation {g.number} "
        "with the approval)"
    )
