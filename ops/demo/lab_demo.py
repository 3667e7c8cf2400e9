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

from ops.lab.deployment import deployed, run_via_vip
from ops.lab.hosts import Host, available


def results(ops: Host) -> list[dict[str, object]]:
    got = run_via_vip(ops)["results"]
    assert isinstance(got, list)
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the lab's directory")
    args = ap.parse_args(argv)
    why = available()
    if why:
        print(f"lab demo: {why}; run ops/demo/cluster_demo.py (loopback) instead", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="ctrl-exec-lab-"))
    t0 = time.monotonic()
    with deployed(root, log=lambda line: None) as (lab, roles, _report):
        print(f"deployed from docs/deploy.md on {len(lab.hosts)} hosts in "
              f"{time.monotonic() - t0:.1f} s (work dir {root})")  # fmt: skip
        ops, disp1 = roles["operator"][0], roles["dispatcher"][0]
        for r in results(ops):
            print(f"  {r['host']}: exit {r['exit']}, {str(r.get('stdout', '')).strip()}")
        status = json.loads(disp1.run(["/opt/ctrl-exec/venv/bin/ced", "cluster", "status",
                                       "--json"], env=disp1.env()).stdout)  # fmt: skip
        leader = lab.hosts[status["leader"]]
        leader.run("systemctl stop ctrl-exec-api", env=leader.env())
        print(f"stopped ctrl-exec-api on {leader.name} (the leader); through the VIP again:")
        for r in results(ops):
            print(f"  {r['host']}: exit {r['exit']}, {str(r.get('stdout', '')).strip()}")
        other = next(h for h in roles["dispatcher"] if h is not leader)
        print(other.run(["/opt/ctrl-exec/venv/bin/ced", "cluster", "status"],
                        env=other.env()).stdout)  # fmt: skip
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    print(f"done in {time.monotonic() - t0:.1f} s")
    print("lab demo: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
