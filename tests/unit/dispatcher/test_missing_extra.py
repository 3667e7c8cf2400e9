"""Without the ``dispatcher`` extra, ``ctrl-exec-api`` and the ``ced`` verbs that need it
say so in one line (exit 1), not with a ``ModuleNotFoundError`` traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
HIDE = """
import builtins, sys
_real = builtins.__import__
def _fake(name, *a, **k):
    if name.split(".")[0] in ("uvicorn", "fastapi", "etcd3gw"):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return _real(name, *a, **k)
builtins.__import__ = _fake
"""


def run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", HIDE + code, *args], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          timeout=60)  # fmt: skip


def test_ctrl_exec_api_without_the_extra() -> None:
    p = run("from dispatcher.api.entry import main; sys.exit(main())")
    assert p.returncode == 1
    assert p.stderr == ("ctrl-exec-api: this needs the dispatcher extra (module 'uvicorn' is "
                        "missing): pip install 'ctrl-exec[dispatcher]'\n")  # fmt: skip


def test_ced_cluster_verbs_without_the_extra(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(f"etcd_endpoints = http://127.0.0.1:9\nstate_dir = {tmp_path}\n")
    p = run("from dispatcher.ced.main import main; sys.exit(main(sys.argv[1:]))",
            "cluster", "status", "--config", str(conf))  # fmt: skip
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert "this needs the dispatcher extra (module 'etcd3gw' is missing)" in p.stderr


def test_an_unrelated_missing_module_keeps_its_traceback() -> None:
    p = run("from dispatcher.ced.main import on_error\n"
            "on_error(None, ModuleNotFoundError('x', name='nosuchthing'))")  # fmt: skip
    assert p.returncode == 1 and "Traceback" in p.stderr
