"""The runbooks in ``ops/runbooks/`` are executed, not re-typed (DESIGN.md section 4).

Static checks (no cluster): every runbook is in the index, has the sections Pre-flight,
Procedure, Verify and "When this fails" in that order, marks each shell block with a
runbook tag (``ops/runbooks/README.md``), every block is valid bash, every ``ced`` verb it
uses exists, and every environment variable it reads is documented in the README.

Live: one local cluster (``ops/lab/runbook_lab.py``: 3-member etcd, three instances,
HAProxy, two agents paired through HAProxy) serves every runbook in turn. Before each
runbook the cluster is brought back to its baseline (every process running, one leader,
HAProxy routing); then the runbook's blocks run in one ``bash -euo pipefail`` in document
order (``runbook-simulate`` blocks make the failure happen), and every block, including
Verify and the read-only diagnostics, must exit 0.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.ced.cluster import subverbs
from ops.lab.runbook_exec import SECTIONS, Runbook, parse, run
from ops.lab.runbook_lab import RunbookLab, lab_diagnostics, missing_tools, running_lab

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "ops" / "runbooks"
# the order the live test runs them in: the destructive ones last
ORDER = (
    "switchover.md",
    "failover.md",
    "add-remove-instance.md",
)
# multi-host-lab runbooks (```sh on=HOST```), each run by its own live test
ON_THE_LAB = {"onboard-agents.md": "tests/integration/test_runbook_onboarding.py"} | {
    name: "tests/integration/test_runbooks_etcd.py"
    for name in ("etcd-quorum-loss.md", "replace-etcd-member.md", "cert-rotation-ha.md",
                 "ca-compromise.md", "disaster-recovery.md")
}  # fmt: skip
CLUSTER_VERBS = set(subverbs())
_CED = re.compile(r'\bced --config "\$[A-Z_]+" ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?')
_VAR = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)")
_ASSIGN = re.compile(r"(?:^|[\s;(])([A-Z][A-Z0-9_]*)=")


def runbook(name: str) -> Runbook:
    return parse(RUNBOOKS / name)


# ----- static ------------------------------------------------------------------------------


def test_every_runbook_is_indexed_and_tested() -> None:
    found = {p.name for p in RUNBOOKS.glob("*.md")} - {"README.md"} - set(ON_THE_LAB)
    assert found == set(ORDER)
    assert all((ROOT / test).exists() for test in ON_THE_LAB.values())
    index = (RUNBOOKS / "README.md").read_text()
    for name in ORDER:
        assert f"]({name})" in index, name


def test_helper_scripts_are_valid_bash() -> None:
    for script in (RUNBOOKS / "lib.sh", RUNBOOKS / "site-systemd.sh", ROOT / "ops/lab/site.sh"):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, (script, r.stderr)


@pytest.mark.parametrize("name", ORDER)
def test_runbook_structure(name: str) -> None:
    rb = runbook(name)  # raises on a shell block without a runbook tag
    assert rb.title, name
    assert [s for s in rb.sections if s in SECTIONS] == list(SECTIONS), rb.sections
    for section in ("Pre-flight", "Procedure", "Verify"):
        assert rb.in_section(section), f"{name}: no runbook block under {section}"
    assert rb.blocks[0].tag == "runbook" and "lib.sh" in rb.blocks[0].code, rb.blocks[0]
    assert all(b.section != "When this fails" or b.tag == "runbook-diagnose" for b in rb.blocks)
    assert all(b.tag != "runbook-diagnose" or b.section == "When this fails" for b in rb.blocks)
    for b in rb.blocks:
        r = subprocess.run(["bash", "-n"], input=b.code, capture_output=True, text=True)
        assert r.returncode == 0, (b.title, r.stderr)


@pytest.mark.parametrize("name", ORDER)
def test_runbook_uses_real_verbs_and_documented_variables(name: str) -> None:
    from dispatcher.ced.main import VERBS

    rb = runbook(name)
    steps = [b for b in rb.blocks if b.tag != "runbook-simulate"]
    code = "\n".join(b.code for b in steps)
    verbs = _CED.findall(code)
    assert verbs, name
    for verb, sub in verbs:
        assert verb in VERBS, (name, verb)
        if verb == "cluster":
            assert sub in CLUSTER_VERBS, (name, sub)
    calls = len(re.findall(r"(?<![\w-])ced\s", code))
    assert calls == len(verbs), f"{name}: a ced call without --config"
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", (RUNBOOKS / "README.md").read_text()))
    assigned = set(_ASSIGN.findall(code))
    undocumented = set(_VAR.findall(code)) - assigned - documented
    assert not undocumented, f"{name}: variables not in README.md's Environment: {undocumented}"


# ----- live --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunbookLab]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"missing: {' '.join(missing)} (ops/setup.sh installs them)")
    with running_lab(tmp_path_factory.mktemp("runbook-lab")) as started:
        yield started


@pytest.mark.integration
@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", ORDER)
def test_runbook_against_a_live_cluster(lab: RunbookLab, name: str) -> None:
    lab.restore_baseline()
    rb = runbook(name)
    res = run(rb, lab.full_env(), timeout=90, cwd=lab.root)
    print(res.report() if res.ok else "")
    assert res.ok, f"{res.report()}\n{lab_diagnostics(lab)}"
