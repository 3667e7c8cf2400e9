"""``ced`` must start fast: no web framework, etcd client or HTTP library on import."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support.agentproc import ROOT

HEAVY = ("fastapi", "uvicorn", "etcd3gw", "requests")


def _importtime(stmt: str) -> tuple[set[str], int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", stmt], capture_output=True,
                       text=True, env=env, check=True)  # fmt: skip
    names: set[str] = set()
    total = 0
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            names.add(m.group(4).split(".")[0])
            if not m.group(3).strip() and len(m.group(3)) == 1:
                total += int(m.group(2))  # top-level imports only
    return names, total


def test_cli_import_is_light() -> None:
    names, total = _importtime("import dispatcher.cli")
    print(f"import dispatcher.cli: {total / 1000:.1f} ms (cumulative, top-level)")
    assert not names & set(HEAVY), names & set(HEAVY)


def test_run_path_imports_are_light() -> None:
    # What `ced run` / `ced ping` import: no cryptography either (DESIGN.md section 7).
    names, total = _importtime("import dispatcher.cli, dispatcher.operations")
    print(f"import dispatcher.cli + operations: {total / 1000:.1f} ms")
    assert not names & {*HEAVY, "cryptography"}, names & {*HEAVY, "cryptography"}
