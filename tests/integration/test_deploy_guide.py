"""``docs/deploy.md`` runs as written, on a lab of real hosts (:mod:`ops.lab.hosts`).

Eleven hosts, each its own network, mount and UTS namespace with the real default paths:
three etcd members, three dispatcher hosts, two load balancers sharing a virtual IP, two
agent hosts and an operator's machine. Every ``sh on=...`` block of the guide runs on the
hosts it names (:mod:`ops.lab.guide_exec`), with the units' ``ExecStart`` lines started by
the lab's ``systemctl``. Then the deployment is used as an SRE would, through the virtual
IP: a run with the operator certificate, the leader's host stopped, the first load
balancer's HAProxy stopped; each still answers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.lab import deployment
from ops.lab.hosts import Host, Lab, available

GUIDE = Path(os.environ.get("CTRL_EXEC_GUIDE", deployment.GUIDE))
NEEDS = ("etcd", "haproxy", "keepalived", "openssl", "iptables", "jq", "curl")
MISSING = [t for t in NEEDS if shutil.which(t) is None]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    pytest.mark.skipif(available() is not None, reason=f"no lab: {available()}"),
    pytest.mark.skipif(bool(MISSING), reason=f"not installed: {MISSING}"),
]


@pytest.fixture(scope="module")
def deployed(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Lab, dict[str, list[Host]]]]:
    t0 = time.monotonic()
    with deployment.deployed(tmp_path_factory.mktemp("deploy"), GUIDE) as (lab, roles, report):
        print(f"[deploy] guide ran in {time.monotonic() - t0:.1f} s "
              f"({len(report.timings)} blocks on hosts)")  # fmt: skip
        yield lab, roles


def ced(host: Host, *args: str) -> str:
    got = host.run(["/opt/ctrl-exec/venv/bin/ced", *args], env=host.env(), timeout=60)
    return got.stdout


run_via_vip = deployment.run_via_vip


def test_the_guide_deploys_a_working_cluster(deployed: tuple[Lab, dict[str, list[Host]]]) -> None:
    _, roles = deployed
    disp1, ops = roles["dispatcher"][0], roles["operator"][0]
    status = json.loads(ced(disp1, "cluster", "status", "--json"))
    assert status["leader"] in {"disp1", "disp2", "disp3"}
    assert sorted(m["instance_id"] for m in status["members"]) == ["disp1", "disp2", "disp3"]
    assert len({m["generation"] for m in status["members"]}) == 1, status
    doc = run_via_vip(ops)
    results = {r["host"]: r for r in doc["results"]}  # type: ignore[union-attr]
    assert sorted(results) == sorted(deployment.AGENTS)
    assert all(r["exit"] == 0 for r in results.values()), results


def test_the_deployment_survives_losing_the_leaders_host_and_a_load_balancer(
    deployed: tuple[Lab, dict[str, list[Host]]],
) -> None:
    lab, roles = deployed
    disp1, ops = roles["dispatcher"][0], roles["operator"][0]
    leader = json.loads(ced(disp1, "cluster", "status", "--json"))["leader"]
    host = lab.hosts[leader]
    t0 = time.monotonic()
    host.run("systemctl stop ctrl-exec-api", env=host.env())
    doc = run_via_vip(ops)
    print(f"[deploy] run through the VIP {time.monotonic() - t0:.2f} s after stopping {leader}")
    assert all(r["exit"] == 0 for r in doc["results"])  # type: ignore[union-attr]
    other = next(h for h in roles["dispatcher"] if h.name != leader)
    new = json.loads(ced(other, "cluster", "status", "--json"))["leader"]
    assert new and new != leader
    lb1 = roles["lb"][0]
    t0 = time.monotonic()
    lb1.run("systemctl stop haproxy", env=lb1.env())
    doc = run_via_vip(ops)
    print(
        f"[deploy] run through the VIP {time.monotonic() - t0:.2f} s after stopping lb1's HAProxy"
    )
    assert all(r["exit"] == 0 for r in doc["results"])  # type: ignore[union-attr]
    host.run("systemctl start ctrl-exec-api", env=host.env())
