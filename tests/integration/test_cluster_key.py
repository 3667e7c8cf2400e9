"""The cluster key in a cluster started without one: the first leader makes it, the
followers fetch it once from a peer presenting a dispatcher serial, and everything that
follows is sealed with it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.signing import KEY_FILE
from ops.lab.etcd import ETCD, SKIP_REASON
from ops.lab.hacluster import Cluster, ClusterSpec, running_cluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.skipif(ETCD is None, reason=SKIP_REASON),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, script_dir: Path) -> Iterator[Cluster]:
    spec = ClusterSpec(agents={"web1": "127.0.0.2"},
                       scripts={"echo-args": str(script_dir / "echo-args.sh")}, ttl=2,
                       sync_mode="push", tls=True, proxy_protocol=False,
                       cluster_key=False)  # fmt: skip
    with running_cluster(tmp_path_factory.mktemp("clusterkey"), spec) as c:
        yield c
    assert all(code == 0 for code in c.exit_codes.values()), c.exit_codes


def test_first_leader_makes_the_key_and_followers_fetch_it(cluster: Cluster) -> None:
    leader = cluster.one_leader()
    g = cluster.converged(40)
    assert f"ca/{KEY_FILE}" in g.files and g.files[f"ca/{KEY_FILE}"].mode == 0o600
    keys = {i.name: hashlib.sha256((i.ca_dir / KEY_FILE).read_bytes()).hexdigest()
            for i in cluster.running()}  # fmt: skip
    assert len(set(keys.values())) == 1, keys
    for inst in cluster.running():
        assert (inst.ca_dir / KEY_FILE).stat().st_mode & 0o777 == 0o600
    created = [i.name for i in cluster.running()
               if "ACTION=cluster-key" in i.logtext() and "RESULT=created" in i.logtext()]  # fmt: skip
    assert created == [leader.name], created
    for inst in cluster.followers():
        assert "RESULT=bootstrapped" in inst.logtext(), inst.name
    # requests from ced are sealed with the key the followers now hold
    r = cluster.ced(cluster.followers()[0], "--json", "list-requests", timeout=60)
    assert r.returncode == 0, r.stderr
