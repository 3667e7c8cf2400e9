"""``log_target = syslog`` without a reachable syslog socket: one warning, then every line
on stderr (Python 3.11's ``SysLogHandler`` swallows the failed connect and would print a
"Logging error" traceback for every line instead)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.common import logfmt


def test_an_unreachable_syslog_socket_falls_back_to_stderr(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(logfmt, "SYSLOG_SOCKET", str(tmp_path / "no-such-log"))
    logfmt.setup("ctrl-exec-agent", "syslog")
    try:
        logfmt.event("run", script="hello", exit=0)
        time.sleep(0.2)  # the listener thread writes
    finally:
        logfmt.shutdown()
    err = capfd.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err, err
    assert "ACTION=log-target" in err and "not reachable" in err
    assert "ACTION=run" in err and "SCRIPT=hello" in err
