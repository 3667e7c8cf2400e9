"""The attack suite's report: every ``[attack] <name>: refused (<detail>)`` line the tests
of ``tests/security/`` printed, then one count per file and in all, in the terminal summary
(even when output is captured, and in the controller of a ``pytest -n`` run, which sees the
workers' reports with their captured output)."""

from __future__ import annotations

from collections import Counter

import pytest

_ATTACKS: list[tuple[str, str]] = []  # (test file, line)
_FAILED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/security/" not in report.nodeid:
        return
    for line in report.capstdout.splitlines():
        if line.startswith("[attack]") and (report.nodeid, line) not in _ATTACKS:
            _ATTACKS.append((report.nodeid.split("::", 1)[0], line))
    if report.failed:
        _FAILED.append(report.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _ATTACKS and not _FAILED:
        return
    tr = terminalreporter
    tr.section("attack suite (tests/security)")
    seen: set[str] = set()
    for _, line in _ATTACKS:
        if line not in seen:
            seen.add(line)
            tr.write_line(line)
    per_file = Counter(f for f, line in {(f, ln) for f, ln in _ATTACKS})
    for f, n in sorted(per_file.items()):
        tr.write_line(f"  {f}: {n} attacks refused")
    tr.write_line(f"attacks refused: {len(seen)}; attack tests failed: {len(_FAILED)}")
