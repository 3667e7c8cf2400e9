from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.lab.pki import Issued, TestCA

# the attack suite's summary: here, not in tests/security/, so that the controller of a
# parallel run (pytest -n) loads it too
pytest_plugins = ["tests.support.attack_summary", "tests.support.machine_share"]

SCRIPTS = {
    "echo-args": """#!/bin/sh
echo "argc=$#"
i=1
for a in "$@"; do echo "arg$i=[$a]"; i=$((i+1)); done
printf 'stdin='; cat; echo
echo to-stderr >&2
""",
    "exit3": "#!/bin/sh\necho 'about to exit 3'\necho 'exit3 stderr line' >&2\nexit 3\n",
    "env-dump": "#!/bin/sh\nenv | sort\n",
    "sleep1": "#!/bin/sh\nsleep 1\necho slept\n",
    "sleep-long": "#!/bin/sh\nsleep 30\n",
    "big-output": "#!/bin/sh\nhead -c 3000000 /dev/zero | tr '\\\\0' x\n",
    "selfkill": "#!/bin/sh\nkill -9 $$\n",
    "ignore-stdin": "#!/bin/sh\necho ok\n",
}


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def dispatcher_cert(pki: TestCA) -> Issued:
    return pki.issue("dispatcher", cn="ctrl-exec-dispatcher")


@pytest.fixture(scope="session")
def script_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("scripts")
    for name, text in SCRIPTS.items():
        p = d / f"{name}.sh"
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    noexec = d / "noexec.sh"
    noexec.write_text("#!/bin/sh\necho never\n")
    noexec.chmod(0o644)
    return d


@pytest.fixture
def clean_env() -> Iterator[None]:
    old = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(old)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """A failure digest as the run's last lines: one short line a failed test, its crash
    message first (a CI log that keeps only the head and the tail still says what failed;
    the long reports above keep their diagnostics)."""
    failed = [r for key in ("failed", "error") for r in terminalreporter.stats.get(key, [])]
    if not failed:
        return
    terminalreporter.section("failure digest")
    for report in failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = " ".join(str(crash.message if crash else report.longrepr).split())
        terminalreporter.write_line(f"{report.nodeid.rsplit('/', 1)[-1]}: {message[:400]}")
