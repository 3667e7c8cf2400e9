"""``cluster`` is a coordination library: no agent or dispatcher imports, one etcd module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CLUSTER = Path(__file__).resolve().parents[3] / "cluster"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_cluster_imports_neither_agent_nor_dispatcher() -> None:
    files = sorted(CLUSTER.glob("*.py"))
    assert files
    for path in files:
        mods = imported_modules(path)
        assert not mods & {"agent", "dispatcher"}, path
        if path.name != "etcd.py":
            assert not mods & {"etcd3gw", "requests"}, path


def test_local_backend_needs_no_etcd_client() -> None:
    code = (
        "import sys, cluster.backend, cluster.election, cluster.locks, cluster.session;"
        "assert 'etcd3gw' not in sys.modules and 'requests' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=CLUSTER.parent)
