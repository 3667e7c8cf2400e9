from __future__ import annotations

import logging

import pytest

from agent import logfmt


def test_action_first_then_sorted_and_quoted() -> None:
    line = logfmt.format_fields("run", {"script": "echo-args", "exit": 0, "peer": "127.0.0.1",
                                        "dispatcher": "vm", "reqid": "abc", "reason": "two words",
                                        "empty": None, "flag": True})  # fmt: skip
    assert line == ('ACTION=run DISPATCHER=vm EMPTY= EXIT=0 FLAG=1 PEER=127.0.0.1 '
                    'REASON="two words" REQID=abc SCRIPT=echo-args')  # fmt: skip


def test_stderr_sink(capfd: pytest.CaptureFixture[str]) -> None:
    logfmt.setup("ctrl-exec-agent", "stderr")
    try:
        logfmt.event(
            "serial-reject", logging.WARNING, peer="1.2.3.4", peer_serial="", reqid="(none)"
        )
    finally:
        logfmt.shutdown()
    err = capfd.readouterr().err
    assert "ctrl-exec-agent[" in err
    assert err.rstrip().endswith("ACTION=serial-reject PEER=1.2.3.4 PEER_SERIAL= REQID=(none)")
