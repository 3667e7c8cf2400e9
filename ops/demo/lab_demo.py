"""The deployment on real hosts, on one machine: ``docs/deploy.md`` run on eleven lab hosts.

Every host is its own network, mount and UTS namespace with the real default paths
(:mod:`ops.lab.hosts`): three etcd members (TLS, a user with a role), three dispatcher
hosts (``ctrl-exec-api`` started by its systemd unit's ``ExecStart``), two load balancers
(HAProxy, keepalived sharing a virtual IP), two agent hosts (executor mode) paired through
the virtual IP, and an operator's machine. Then real work: a script runs on both agents
through the virtual IP with the operator certificate, the leader's host is stopped and
the script runs again, and ``ced cluster status`` is printed. Needs root (namespaces);
``cluster_demo.py`` is the loopback version for machines without.

    bash ops/setup.sh && .venv/bin/python -m ops.demo.lab_demo [--keep]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ops.lab import guide_exec
from ops.lab.hosts import Host, Lab, available
from ops.lab.proc import ROOT

ROLES = {
    "etcd": ("etcd1", "etcd2", "etcd3"),
    "dispatcher": ("disp1", "disp2", "disp3"),
    "lb": ("lb1", "lb2"),
    "agent": ("web1", "web2"),
    "operator": ("ops",),
}


def run_via_vip(ops: Host) -> list[dict[str, object]]:
    body = json.dumps({"hosts": ["web1.lab.test", "web2.lab.test"], "script": "disk-usage",
                       "args": ["/"]})  # fmt: skip
    got = ops.run(["curl", "-sS", "--fail-with-body", "--retry", "3", "--retry-all-errors",
                   "--cacert", "/root/ca.crt", "--cert", "/root/alice.crt",
                   "--key", "/root/alice.key", "-H", "Content-Type: application/json",
                   "-d", body, "https://ctrl-exec.lab.test:7445/run"],
                  env=ops.env(), timeout=90)  # fmt: skip
    results = json.loads(got.stdout)["results"]
    assert isinstance(results, list)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the lab's directory")
    args = ap.parse_args()
    why = available()
    if why:
        print(f"lab demo: {why}; run ops/demo/cluster_demo.py (loopback) instead", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="ctrl-exec-lab-"))
    t0 = time.monotonic()
    with Lab(root, binds={"/opt/ctrl-exec/venv": ROOT / ".venv"}) as lab:
        roles = {role: [lab.add(n) for n in names] for role, names in ROLES.items()}
        vip = lab.address(200)
        lab.add_name("ctrl-exec.lab.test", vip)
        site = "\n".join([
            "DOMAIN=lab.test", 'ETCD_HOSTS="etcd1 etcd2 etcd3"', 'DISPATCHERS="disp1 disp2 disp3"',
            'LBS="lb1 lb2"', f"VIP={vip}", "VIP_PREFIX=24", "VIP_NAME=ctrl-exec.lab.test",
            "LB_IFACE=eth0", 'AGENTS="web1 web2"', "OPERATOR=alice", "OPERATOR_HOST=ops",
        ])  # fmt: skip
        guide = guide_exec.parse(ROOT / "docs" / "deploy.md")
        guide_exec.run(guide, roles, site, timeout=240, log=lambda line: None)
        print(f"deployed from docs/deploy.md on {len(lab.hosts)} hosts in "
              f"{time.monotonic() - t0:.1f} s (work dir {root})")  # fmt: skip
        ops, disp1 = roles["operator"][0], roles["dispatcher"][0]
        for r in run_via_vip(ops):
            print(f"  {r['host']}: exit {r['exit']}, {str(r.get('stdout', '')).strip()}")
        status = json.loads(disp1.run(["/opt/ctrl-exec/venv/bin/ced", "cluster", "status",
                                       "--json"], env=disp1.env()).stdout)  # fmt: skip
        leader = lab.hosts[status["leader"]]
        leader.run("systemctl stop ctrl-exec-api", env=leader.env())
        print(f"stopped ctrl-exec-api on {leader.name} (the leader); through the VIP again:")
        for r in run_via_vip(ops):
            print(f"  {r['host']}: exit {r['exit']}, {str(r.get('stdout', '')).strip()}")
        other = next(h for h in roles["dispatcher"] if h is not leader)
        print(other.run(["/opt/ctrl-exec/venv/bin/ced", "cluster", "status"],
                        env=other.env()).stdout)  # fmt: skip
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    print(f"done in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
