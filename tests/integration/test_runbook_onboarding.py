"""``ops/runbooks/onboard-agents.md`` runs as written on the multi-host lab: 200 agents pair
with pairing tokens and answer a ping.

The lab is ``docs/deploy.md`` deployed (:func:`ops.lab.deployment.deployed`: etcd with TLS
and auth, three dispatchers, HAProxy and keepalived, two agents paired by hand) plus
``FLEET_HOSTS`` new agent hosts; the runbook's ``simulate`` block installs
``PER_HOST`` agent instances on each (200 agents from 50 source addresses: each
``request-pairing`` opens two connections, within the pairing listener's limit of 10 per
address and minute), its blocks pair them through the
virtual IP, each with its own token, start them and ping them all. Memory: one agent
process (about 30 MB) per agent while the test runs.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.lab import deployment, guide_exec, runbook_etcd
from ops.lab.hosts import Host, Lab, available

RUNBOOK = Path(__file__).resolve().parents[2] / "ops" / "runbooks" / "onboard-agents.md"
FLEET_HOSTS = 50
PER_HOST = 4  # fixed by the runbook's simulate block
NEEDS = ("etcd", "haproxy", "keepalived", "openssl", "iptables", "jq", "curl")
MISSING = [t for t in NEEDS if shutil.which(t) is None]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.exclusive,  # 200 agents pairing at once: load past 100 on 2 cores
    pytest.mark.timeout(2400),  # the deployment included; a loaded machine is slow
    pytest.mark.skipif(available() is not None, reason=f"no lab: {available()}"),
    pytest.mark.skipif(bool(MISSING), reason=f"not installed: {MISSING}"),
]


def site(lab: Lab, agents: list[str]) -> str:
    """The site values :func:`ops.lab.deployment.deployed` uses, with ``AGENTS`` the fleet."""
    return "\n".join([
        "DOMAIN=lab.test", 'ETCD_HOSTS="etcd1 etcd2 etcd3"', 'DISPATCHERS="disp1 disp2 disp3"',
        'LBS="lb1 lb2"', f"VIP={lab.address(200)}", "VIP_PREFIX=24",
        f"VIP_NAME={deployment.VIP_NAME}", "LB_IFACE=eth0", f'AGENTS="{" ".join(agents)}"',
        "OPERATOR=alice", "OPERATOR_HOST=ops",
    ])  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[Lab, dict[str, list[Host]]]]:  # fmt: skip
    t0 = time.monotonic()
    with deployment.deployed(tmp_path_factory.mktemp("onboard")) as (lab, roles, _):
        t1 = time.monotonic()
        fleet = [lab.add(f"ag{n:02d}") for n in range(1, FLEET_HOSTS + 1)]
        print(f"[onboard] lab deployed in {t1 - t0:.1f} s, {len(fleet)} more agent hosts "
              f"in {time.monotonic() - t1:.1f} s")  # fmt: skip
        yield lab, {**roles, "agent": fleet}


def ced(host: Host, *args: str) -> object:
    got = host.run(["/opt/ctrl-exec/venv/bin/ced", "--json", *args], env=host.env(), timeout=120)
    return json.loads(got.stdout)


def test_runbook_onboards_200_agents_with_tokens(
    lab: tuple[Lab, dict[str, list[Host]]],
) -> None:
    the_lab, roles = lab
    blocks = guide_exec.parse(RUNBOOK)
    sections = {b.section for b in blocks}
    assert {"Pre-flight", "Procedure", "Verify", "When this fails"} <= sections, sections
    assert any(b.simulate for b in blocks) and any(b.diagnose for b in blocks)
    values = site(the_lab, [h.name for h in roles["agent"]])
    first, middle, last = (
        [b for b in blocks if b.section == "Pre-flight"],
        [b for b in blocks if b.section in ("Procedure", "Verify")],
        [b for b in blocks if b.section == "When this fails"],
    )
    guide_exec.run(first, roles, values, timeout=240)
    t0 = time.monotonic()
    try:
        guide_exec.run(middle, roles, values, timeout=900)
    except guide_exec.GuideStepFailed as exc:
        pytest.fail(f"{exc}\n{runbook_etcd.diagnostics(roles)}")
    took = time.monotonic() - t0
    guide_exec.run(last, roles, values, timeout=120)
    total = FLEET_HOSTS * PER_HOST
    print(f"[runbook] onboard-agents: {took:.1f} s ({total} agents, "
          f"{total / took:.1f} agents/s, pairing to every ping answered)")  # fmt: skip

    disp1 = roles["dispatcher"][0]
    batch = disp1.path("/etc/ctrl-exec/onboard/batch").read_text().strip()
    agents = ced(disp1, "list-agents", "--tags", f"batch={batch}")
    assert isinstance(agents, list)
    names = sorted(a["hostname"] for a in agents)
    assert names == sorted(f"ag{h:02d}-{n:02d}.lab.test" for h in range(1, FLEET_HOSTS + 1)
                           for n in range(1, PER_HOST + 1))  # fmt: skip
    tokens = ced(disp1, "pairing-token", "list")
    assert isinstance(tokens, dict)
    mine = [t for t in tokens["tokens"] if t["tags"].get("batch") == batch]
    assert len(mine) == total and {t["state"] for t in mine} == {"used"}
    assert sorted(t["used_by"] for t in mine) == names  # each token once, each agent one
    # the hand-paired agents of the deployment are untouched
    assert deployment.run_via_vip(roles["operator"][0]).get("results")
