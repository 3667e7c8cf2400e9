"""The live cluster of the runbook test: :class:`ops.lab.runbook_lab.RunbookLab`.

Not :mod:`tests.support.hacluster`: the runbooks start, stop and kill etcd members,
instances and HAProxy from bash (through the lab's site adapter ``ops/lab/site.sh``), so
every control-plane process here is started from a config file and tracked by a pidfile
that bash and Python both see, rather than by a ``Popen`` object of the test process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ops.lab.runbook_lab import LabError, RunbookLab, missing_tools

__all__ = ["LabError", "RunbookLab", "lab_diagnostics", "missing_tools", "running_lab"]


@contextmanager
def running_lab(root: Path) -> Iterator[RunbookLab]:
    """A started lab under ``root``; every process of it is stopped by PID at the end."""
    lab = RunbookLab(root)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()


def lab_diagnostics(lab: RunbookLab, lines: int = 25) -> str:
    """The tail of every instance's and HAProxy's log (for a failure message)."""
    out = []
    for log in sorted((lab.root / "logs").glob("*.log")):
        if log.name.startswith("etcd-"):
            continue
        text = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"=== {log.name}\n" + "\n".join(text))
    return "\n".join(out)
