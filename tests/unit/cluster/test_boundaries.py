"""The embedded backend needs no etcd client (the import rules are in tests/unit/test_layers.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CLUSTER = Path(__file__).resolve().parents[3] / "cluster"


def test_local_backend_needs_no_etcd_client() -> None:
    code = (
        "import sys, cluster.backend, cluster.election, cluster.locks, cluster.session;"
        "assert 'etcd3gw' not in sys.modules and 'requests' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=CLUSTER.parent)
