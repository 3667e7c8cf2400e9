"""The deployment of ``docs/deploy.md`` on eleven lab hosts (:mod:`ops.lab.hosts`), shared by
``tests/integration/test_deploy_guide.py`` and ``ops/demo/lab_demo.py``: three etcd members,
three dispatcher hosts, two load balancers sharing a virtual IP, two agents, an operator's
machine; the guide's site values set for the lab. With ``spare=True`` a fourth dispatcher host
(``disp4``, role ``new-dispatcher``, named by the site variable ``NEW_DISPATCHER``) stands
by, untouched by the guide, for the runbook that adds an instance."""

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


SPARE = "disp4"  # the spare dispatcher host of ``deployed(spare=True)``


def site(lab: Lab | str, spare: bool = False) -> str:
    """The deployment guide's ``sh site`` block with the values of ``lab`` (or of a lab whose
    virtual IP is ``lab``): also what the runbooks run with. With ``spare``,
    ``NEW_DISPATCHER``: the host the add-instance runbook adds."""
    vip = lab if isinstance(lab, str) else lab.address(200)
    lines = [
        "DOMAIN=lab.test", 'ETCD_HOSTS="etcd1 etcd2 etcd3"', 'DISPATCHERS="disp1 disp2 disp3"',
        'LBS="lb1 lb2"', f"VIP={vip}", "VIP_PREFIX=24", f"VIP_NAME={VIP_NAME}",
        "LB_IFACE=eth0", 'AGENTS="web1 web2"', "OPERATOR=alice", "OPERATOR_HOST=ops",
    ]  # fmt: skip
    if spare:
        lines.append(f"NEW_DISPATCHER={SPARE}")
    return "\n".join(lines)


@contextlib.contextmanager
def deployed(
    root: Path, guide: Path = GUIDE, log: Callable[[str], None] = print, *, spare: bool = False
) -> Iterator[tuple[Lab, dict[str, list[Host]], guide_exec.Report]]:
    """The lab with ``guide`` run on it; everything stopped on the way out. ``spare``: one
    more dispatcher host, role ``new-dispatcher``, that the guide leaves alone."""
    with Lab(root, binds={"/opt/ctrl-exec/venv": ROOT / ".venv"}) as lab:
        roles = {role: [lab.add(n) for n in names] for role, names in ROLES.items()}
        if spare:
            roles["new-dispatcher"] = [lab.add(SPARE)]
        vip = lab.address(200)
        lab.add_name(VIP_NAME, vip)
        report = guide_exec.run(guide_exec.parse(guide), roles, site(vip, spare), timeout=240,
                                log=log)  # fmt: skip
        yield lab, roles, report


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
