"""The deployment of ``docs/deploy.md`` on eleven lab hosts (:mod:`ops.lab.hosts`), shared by
``tests/integration/test_deploy_guide.py`` and ``ops/demo/lab_demo.py``: three etcd members,
three dispatcher hosts, two load balancers sharing a virtual IP, two agents, an operator's
machine; the guide's site values set for the lab."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from ops.lab import guide_exec
from ops.lab.hosts import Host, Lab
from ops.lab.proc import ROOT

GUIDE = ROOT / "docs" / "deploy.md"
VIP_NAME = "ctrl-exec.lab.test"
AGENTS = ("web1.lab.test", "web2.lab.test")  # as they register (their FQDN)
ROLES = {
    "etcd": ("etcd1", "etcd2", "etcd3"),
    "dispatcher": ("disp1", "disp2", "disp3"),
    "lb": ("lb1", "lb2"),
    "agent": ("web1", "web2"),
    "operator": ("ops",),
}


@contextlib.contextmanager
def deployed(
    root: Path, guide: Path = GUIDE, log: Callable[[str], None] = print
) -> Iterator[tuple[Lab, dict[str, list[Host]], guide_exec.Report]]:
    """The lab with ``guide`` run on it; everything stopped on the way out."""
    with Lab(root, binds={"/opt/ctrl-exec/venv": ROOT / ".venv"}) as lab:
        roles = {role: [lab.add(n) for n in names] for role, names in ROLES.items()}
        lab.add_name(VIP_NAME, lab.address(200))
        report = guide_exec.run(guide_exec.parse(guide), roles, site(lab), timeout=240, log=log)
        yield lab, roles, report


def site(lab: Lab) -> str:
    """The guide's site values (its ``sh site`` block) for ``lab``: also what the runbooks
    run with."""
    return "\n".join([
        "DOMAIN=lab.test", 'ETCD_HOSTS="etcd1 etcd2 etcd3"', 'DISPATCHERS="disp1 disp2 disp3"',
        'LBS="lb1 lb2"', f"VIP={lab.address(200)}", "VIP_PREFIX=24", f"VIP_NAME={VIP_NAME}",
        "LB_IFACE=eth0", 'AGENTS="web1 web2"', "OPERATOR=alice", "OPERATOR_HOST=ops",
    ])  # fmt: skip


def run_via_vip(ops: Host) -> dict[str, object]:
    """``POST /run`` of ``disk-usage`` on both agents through the virtual IP, as the
    operator ``alice`` (the certificate the guide copied to the operator's machine)."""
    body = json.dumps({"hosts": list(AGENTS), "script": "disk-usage", "args": ["/"]})
    got = ops.run(
        ["curl", "-sS", "--fail-with-body", "--max-time", "20", "--retry", "3",
         "--retry-all-errors", "--cacert", "/root/ca.crt", "--cert", "/root/alice.crt",
         "--key", "/root/alice.key", "-H", "Content-Type: application/json",
         "-d", body, f"https://{VIP_NAME}:7445/run"],
        env=ops.env(), timeout=90,
    )  # fmt: skip
    doc = json.loads(got.stdout)
    assert isinstance(doc, dict)
    return doc
