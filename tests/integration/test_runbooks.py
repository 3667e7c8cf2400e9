"""The runbooks in ``ops/runbooks/`` are executed, not re-typed (DESIGN.md section 4).

Static checks, over every ``*.md`` in ``ops/runbooks/`` (whoever wrote it): it is in the
README's index; it has the sections Pre-flight, Procedure, Verify and "When this fails" in
that order; every ``sh`` block says where it runs (``on=``, a host the lab has) and is valid
bash; ``diagnose`` blocks are under "When this fails" and nothing else is; every ``ced``
verb it uses exists. The README's index lists every runbook the project has.

Live: one multi-host lab (:func:`ops.lab.deployment.deployed`: ``docs/deploy.md`` run on
eleven namespace hosts with the real default paths, plus the spare dispatcher host of
``add-remove-instance.md``) serves the runbooks of :data:`ORDER` in turn. Before each, the
baseline is checked (one leader, every member ready, both agents answer a run through the
virtual IP); then the runbook's blocks run on the hosts they name with the lab's site
values (:mod:`ops.lab.guide_exec`), ``simulate`` blocks included, and every block, Verify's
and the read-only diagnostics included, must exit 0. Each prints its duration.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.ced.cluster import subverbs
from dispatcher.ced.main import VERBS
from ops.lab import deployment, guide_exec
from ops.lab.hosts import LAB_BIN, Host, Lab, available

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "ops" / "runbooks"
SECTIONS = ("Pre-flight", "Procedure", "Verify", "When this fails")
#: every runbook the project has (issue 11); the README's index lists each
INDEX = (
    "failover.md", "switchover.md", "add-remove-instance.md", "rolling-upgrade.md",
    "lb-loss.md", "leader-partition.md", "follower-disk-full.md", "disaster-recovery.md",
    "etcd-quorum-loss.md", "replace-etcd-member.md", "cert-rotation-ha.md", "ca-compromise.md",
    "onboard-agents.md",
)  # fmt: skip
#: run live here, in this order, on one lab (the etcd and certificate runbooks run in
#: tests/integration/test_runbooks_etcd.py)
ORDER = (
    "switchover.md", "failover.md", "leader-partition.md", "follower-disk-full.md",
    "lb-loss.md", "rolling-upgrade.md", "add-remove-instance.md",
)  # fmt: skip
ROLES = {*deployment.ROLES, "new-dispatcher"}
_CED = re.compile(
    r"(?:(?<![\w.-])ced|\$\{?CED\}?)[ \t]+(?:--json[ \t]+)?([a-z][a-z-]*)(?:[ \t]+([a-z][a-z-]*))?"
)
PATH = f"{LAB_BIN}:/opt/ctrl-exec/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def runbooks() -> list[str]:
    return sorted(p.name for p in RUNBOOKS.glob("*.md") if p.name != "README.md")


def top_sections(path: Path) -> list[tuple[int, str]]:
    """``(line, title)`` of each ``## `` heading (outside code blocks)."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            out.append((n, line[3:].strip()))
    return out


def section_of(heads: list[tuple[int, str]], line: int) -> str:
    return next((title for n, title in reversed(heads) if n < line), "")


# ----- static ------------------------------------------------------------------------------


def test_the_index_lists_every_runbook() -> None:
    index = (RUNBOOKS / "README.md").read_text()
    for name in sorted({*INDEX, *runbooks()}):
        assert f"]({name})" in index, f"{name} is not in ops/runbooks/README.md's index"
    assert set(ORDER) <= set(runbooks())


@pytest.mark.parametrize("name", runbooks())
def test_runbook_structure(name: str) -> None:
    path = RUNBOOKS / name
    heads = top_sections(path)
    titles = [t for _, t in heads]
    assert [t for t in titles if t in SECTIONS] == list(SECTIONS), (name, titles)
    blocks = guide_exec.parse(path)  # raises on a sh/bash block without on=
    assert not any(b.target == "site" for b in blocks), f"{name}: the site block is the README's"
    for b in blocks:
        assert b.target in ROLES or (
            re.fullmatch(r"(.+)-(\d+)", b.target) and b.target.rsplit("-", 1)[0] in ROLES
        ), f"{name}: {b.title}: no such host or role"
        section = section_of(heads, b.line)
        assert (section == "When this fails") == b.diagnose, f"{name}: {b.title} in {section}"
        script = f"{deployment.site('192.0.2.10', spare=True)}\n{b.code}"
        r = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True,
                           timeout=10)  # fmt: skip
        assert r.returncode == 0, (name, b.title, r.stderr)
    for section in ("Pre-flight", "Procedure", "Verify"):
        assert any(section_of(heads, b.line) == section and not b.simulate for b in blocks), (
            f"{name}: no command under {section}"
        )


@pytest.mark.parametrize("name", runbooks())
def test_runbook_uses_real_ced_verbs(name: str) -> None:
    code = "\n".join(b.code for b in guide_exec.parse(RUNBOOKS / name))
    cluster_verbs = set(subverbs())
    for verb, sub in _CED.findall(code):
        assert verb in VERBS, f"{name}: ced {verb}"
        if verb == "cluster":
            assert sub in cluster_verbs, f"{name}: ced cluster {sub}"


def test_the_structure_check_fails_on_a_block_without_a_host(tmp_path: Path) -> None:
    bad = tmp_path / "bad.md"
    bad.write_text("# x\n\n## Pre-flight\n\n```sh\nced cluster status\n```\n")
    with pytest.raises(guide_exec.GuideFormatError):
        guide_exec.parse(bad)


# ----- live --------------------------------------------------------------------------------

NEEDS = ("etcd", "haproxy", "keepalived", "openssl", "iptables", "jq", "curl", "socat")
MISSING = [t for t in NEEDS if shutil.which(t) is None]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, dict[str, list[Host]]]]:
    if available() is not None:
        pytest.skip(f"no lab: {available()}")
    if MISSING:
        pytest.skip(f"not installed: {MISSING} (ops/setup.sh installs them)")
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("runbooks")
    with deployment.deployed(root, log=lambda _: None, spare=True) as (the_lab, roles, _):
        print(f"[runbook] lab deployed in {time.monotonic() - t0:.1f} s")
        yield the_lab, roles


def baseline(roles: dict[str, list[Host]], limit: float = 90) -> None:
    """One leader, every member ready and serving, both agents answer through the VIP
    (waited for up to ``limit`` s)."""
    disp1, ops = roles["dispatcher"][0], roles["operator"][0]
    names = [h.name for h in roles["dispatcher"]]
    probe = "; ".join(
        f"echo {n} $(curl -s -o /dev/null -w '%{{http_code}}' -m 2 http://{n}.lab.test:7446/ready)"
        f" $(curl -s -o /dev/null -w '%{{http_code}}' -m 2 http://{n}.lab.test:7446/leader)"
        for n in names
    )
    deadline = time.monotonic() + limit
    seen = ""
    for _ in range(200):
        got = disp1.run(probe, env=disp1.env({"PATH": PATH}), check=False, timeout=30)
        rows = [ln.split() for ln in got.stdout.splitlines()]
        seen = got.stdout
        ready = all(len(r) == 3 and r[1] == "200" for r in rows) and len(rows) == len(names)
        if ready and sum(r[2] == "200" for r in rows) == 1:
            break
        assert time.monotonic() < deadline, f"baseline not reached in {limit} s:\n{seen}"
        time.sleep(1)
    status = json.loads(
        disp1.run(["ced", "cluster", "status", "--json"], env=disp1.env({"PATH": PATH}),
                  timeout=60).stdout
    )  # fmt: skip
    assert status["leader"] in names, status
    assert sorted(m["instance_id"] for m in status["members"]) == names, status
    assert all(m["state"] == "serving" for m in status["members"]), status
    doc = deployment.run_via_vip(ops)
    results = doc["results"]
    assert isinstance(results, list) and len(results) == len(deployment.AGENTS), doc
    assert all(r["exit"] == 0 for r in results), doc


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ORDER)
def test_runbook_on_the_multi_host_lab(lab: tuple[Lab, dict[str, list[Host]]], name: str) -> None:
    the_lab, roles = lab
    baseline(roles)
    vip = the_lab.names[deployment.VIP_NAME]
    lines: list[str] = []
    t0 = time.monotonic()
    try:
        guide_exec.run(guide_exec.parse(RUNBOOKS / name), roles, deployment.site(vip, spare=True),
                       timeout=300, log=lines.append, env={"PATH": PATH})  # fmt: skip
    finally:
        print("\n".join(lines))
        print(f"[runbook] {name.removesuffix('.md')}: {time.monotonic() - t0:.1f} s")
    baseline(roles)
