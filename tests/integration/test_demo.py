"""The README's first command: ``python -m ops.demo`` runs to the end and cleans up.

It runs the multi-host lab where namespaces can be made (that deployment is
``tests/integration/test_deploy_guide.py``'s, so it is not run twice here: the choice is
checked below), else the loopback layout, run here end to end with ``--loopback``: it starts etcd (when installed), three ``ctrl-exec-api`` instances, HAProxy and
three agents on 127.0.0.2-4, pairs the agents through HAProxy, runs a script on each
through HAProxy's API frontend and prints the cluster status. Free ports only, so it never
collides with a demo someone runs by hand.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ops.lab.haproxy import HAPROXY, SKIP_REASON

ROOT = Path(__file__).resolve().parents[2]

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
    r = subprocess.run([sys.executable, "-m", "ops.demo", "--loopback", "--free-ports"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    first, second = out.splitlines()[:2]
    assert first == "demo: the loopback layout on one filesystem (--loopback asked for)"
    work = second.split("work dir: ", 1)[1].strip()
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
        # the operator certificate's CN, not the body's username "demo"
        "auth hook saw: run source_ip=127.0.0.9 user=demo-operator identity=demo-operator",
        "$ ced ping agent1.demo agent2.demo agent3.demo",
        "cluster status",
        "cluster demo: OK",
    ):
        assert needle in out, f"{needle!r} missing:\n{out}"
    # HAProxy's PROXY header gave the instance the client's address, and the hop
    assert any("PEER=127.0.0.9 " in ln and "VIA=127.0.0.1" in ln for ln in out.splitlines()), out
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


def test_the_demo_runs_the_lab_where_namespaces_can_be_made(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    demo_main = importlib.import_module("ops.demo.__main__")
    from ops.demo import cluster_demo, lab_demo

    ran: list[tuple[str, list[str]]] = []

    def fake(kind: str) -> Callable[[list[str]], int]:
        def main(argv: list[str]) -> int:
            ran.append((kind, argv))
            return 0

        return main

    monkeypatch.setattr(lab_demo, "main", fake("lab"))
    monkeypatch.setattr(cluster_demo, "main", fake("loopback"))
    monkeypatch.setattr(demo_main, "available", lambda: None)
    assert demo_main.main(["--keep"]) == 0
    monkeypatch.setattr(demo_main, "available", lambda: "network and mount namespaces need root")
    assert demo_main.main(["--keep"]) == 0
    assert ran == [("lab", ["--keep"]), ("loopback", ["--keep"])]
    out = capsys.readouterr().out
    assert "demo: the multi-host lab" in out
    assert (
        "demo: the loopback layout on one filesystem (network and mount namespaces need root)"
        in out
    )
