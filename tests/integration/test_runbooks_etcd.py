"""The etcd, disaster-recovery and certificate runbooks run from their markdown on the
multi-host lab (:func:`ops.lab.deployment.deployed`: etcd with TLS and auth, three
dispatcher hosts in push mode with the real default paths, two load balancers sharing a
virtual IP, two agents, the operator's machine).

One lab serves every runbook, in :data:`ops.lab.runbook_etcd.ORDER`: quorum loss, replacing
a member, dispatcher certificate rotation, a suspected CA compromise, disaster recovery.
Between runbooks the lab must be at its baseline (every etcd member healthy, one leader and
every instance serving, both agents answering through the virtual IP). Each runbook's
blocks run on the hosts they name (``simulate`` blocks make the failure happen); every
block, Verify and the diagnostics included, must exit 0. Each prints its duration; the
disaster recovery prints the time until every agent answered (target 60 s).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ops.lab import deployment, guide_exec, runbook_etcd
from ops.lab.hosts import Host, Lab, available

NEEDS = ("etcd", "etcdctl", "haproxy", "keepalived", "openssl", "iptables", "jq", "curl")
MISSING = [t for t in NEEDS if shutil.which(t) is None]
DR_TARGET = 60.0

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(available() is not None, reason=f"no lab: {available()}"),
    pytest.mark.skipif(bool(MISSING), reason=f"not installed: {MISSING}"),
]


@dataclass
class Deployed:
    lab: Lab
    roles: dict[str, list[Host]]
    site: str


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    t0 = time.monotonic()
    with deployment.deployed(tmp_path_factory.mktemp("rb-etcd"), log=lambda _: None) as (
        lab, roles, _,
    ):  # fmt: skip
        print(f"[runbook] lab deployed in {time.monotonic() - t0:.1f} s")
        yield Deployed(lab, roles, deployment.site(lab))


def _run(d: Deployed, name: str) -> runbook_etcd.Result:
    took = runbook_etcd.baseline(d.roles)
    print(f"[runbook] baseline before {name}: {took:.1f} s")
    try:
        return runbook_etcd.run(runbook_etcd.RUNBOOKS / name, d.roles, d.site,
                                log=lambda _: None)  # fmt: skip
    except guide_exec.GuideStepFailed as exc:
        pytest.fail(f"{exc}\n{runbook_etcd.diagnostics(d.roles)}")


def test_the_runbooks_are_the_ones_this_test_runs() -> None:
    for name in runbook_etcd.ORDER:
        blocks = guide_exec.parse(runbook_etcd.RUNBOOKS / name)
        sections = [b.section for b in blocks]
        for section in ("Pre-flight", "Procedure", "Verify", "When this fails"):
            assert section in sections, (name, section)
        planned = name == "cert-rotation-ha.md"  # no failure to make happen
        assert any(b.simulate for b in blocks) != planned, name
        assert all(b.diagnose == (b.section == "When this fails") for b in blocks), name


@pytest.mark.timeout(900)  # the first test also deploys the lab (~30 s idle, minutes loaded)
def test_etcd_quorum_loss(deployed: Deployed) -> None:
    print(_run(deployed, "etcd-quorum-loss.md").line())


@pytest.mark.timeout(600)
def test_replace_etcd_member(deployed: Deployed) -> None:
    print(_run(deployed, "replace-etcd-member.md").line())


@pytest.mark.timeout(600)
def test_cert_rotation_ha(deployed: Deployed) -> None:
    print(_run(deployed, "cert-rotation-ha.md").line())


@pytest.mark.timeout(900)
def test_ca_compromise(deployed: Deployed) -> None:
    disp1 = deployed.roles["dispatcher"][0]
    # control: with the CA key, a certificate with the dispatcher's public serial opens
    # every agent (so the check after the runbook can fail)
    before = runbook_etcd.forged_ping(disp1, leaked="/etc/ctrl-exec")
    assert before == dict.fromkeys(deployment.AGENTS, "200"), before
    assert runbook_etcd.forged_operator_call(disp1, leaked="/etc/ctrl-exec") == "200"
    result = _run(deployed, "ca-compromise.md")
    print(result.line())
    # the leaked keys (copied by the runbook's simulate block) no longer open anything
    after = runbook_etcd.forged_ping(disp1)
    print(f"[attack] dispatcher certificate signed with the leaked CA key: refused ({after})")
    assert sorted(after) == sorted(deployment.AGENTS)
    assert all(code == "000" for code in after.values()), after
    codes = [runbook_etcd.forged_operator_call(disp1) for _ in range(3)]  # every instance
    print(
        f"[attack] operator certificate signed with the leaked operator CA key: refused ({codes})"
    )
    assert codes == ["000"] * 3, codes


@pytest.mark.timeout(600)
def test_disaster_recovery(deployed: Deployed) -> None:
    result = _run(deployed, "disaster-recovery.md")
    print(result.line())
    took = [float(m[1]) for line in result.printed
            if (m := re.search(r"every agent answering ([\d.]+) s", line))]  # fmt: skip
    assert len(took) == 1, result.printed
    print(f"[runbook] disaster-recovery: every agent answering {took[0]:.1f} s after the "
          f"first Procedure command (target {DR_TARGET:.0f} s)")  # fmt: skip
    assert took[0] <= DR_TARGET, took
    runbook_etcd.baseline(deployed.roles)
