"""The README's first command: ``ops/demo/cluster_demo.py`` runs to the end and cleans up.

The demo starts etcd (when installed), three ``ctrl-exec-api`` instances, HAProxy and
three agents on 127.0.0.2-4, pairs the agents through HAProxy, runs a script on each
through HAProxy's API frontend and prints the cluster status. Free ports only, so it never
collides with a demo someone runs by hand.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ops.lab.haproxy import HAPROXY, SKIP_REASON

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "ops" / "demo" / "cluster_demo.py"

pytestmark = [pytest.mark.integration, pytest.mark.skipif(HAPROXY is None, reason=SKIP_REASON)]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{entry.name}: {cmd}")
    return found


@pytest.mark.timeout(150)
def test_cluster_demo_runs_end_to_end() -> None:
    r = subprocess.run([sys.executable, str(DEMO), "--free-ports"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)  # fmt: skip
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    work = out.splitlines()[0].split("work dir: ", 1)[1].strip()
    for needle in (
        "$ ced setup-ca",
        "$ ced setup-ctrl-exec",
        "$ ced setup-operator-ca",
        "$ ced issue-operator demo-operator",
        "be_ctrl_exec_api: {'i1': 'UP', 'i2': 'UP', 'i3': 'UP'}",
        "send-proxy-v2",
        "$ ced list-requests",
        "addr=127.0.0.2:",
        "addr=127.0.0.3:",
        "addr=127.0.0.4:",
        "PEER=127.0.0.9 VIA=127.0.0.1",
        # the operator certificate's CN, not the body's username "demo"
        "auth hook saw: run source_ip=127.0.0.9 user=demo-operator identity=demo-operator",
        "$ ced ping agent1.demo agent2.demo agent3.demo",
        "cluster status",
        "cluster demo: OK",
    ):
        assert needle in out, f"{needle!r} missing:\n{out}"
    for n in (1, 2, 3):
        assert f"==> agent{n}.demo  [OK  exit:0]" in out
        assert f"agent{n}.demo: paired" in out
    status = out.split("cluster status", 1)[1]
    assert "leader" in status and all(f"i{n}" in status for n in (1, 2, 3)), status
    ping = [ln for ln in out.splitlines() if ln.strip().startswith("agent") and " ok " in ln]
    assert len(ping) == 3, out
    # every process the demo started is gone, and so is its work directory
    assert _processes_mentioning(work) == []
    assert not Path(work).exists()
