from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.common import logfmt
from ops.lab.proc import ROOT


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


# ----- queued=False: the one-shot sink (no logging module) ---------------------------------


@pytest.fixture
def restore_logfmt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logfmt, "_direct", None)  # restored after the test


def _emit_both_ways(ident: str, target: str) -> None:
    """The same three events through the logging handlers, then through the direct sink."""
    for queued in (True, False):
        logfmt.setup(ident, target, logfmt.INFO, queued=queued)
        try:
            logfmt.event("run", script="s", reason="two words")
            logfmt.event("debugging", logfmt.DEBUG)  # below the level: dropped
            with logfmt.context(epoch=7):
                logfmt.event("serial-reject", logfmt.WARNING, peer="1.2.3.4")
        finally:
            logfmt.shutdown()


@pytest.mark.usefixtures("restore_logfmt")
def test_direct_stderr_sink_writes_what_the_handler_writes(
    capfd: pytest.CaptureFixture[str],
) -> None:
    _emit_both_ways("ced-test", "stderr")
    lines = capfd.readouterr().err.splitlines()
    stamps = [ln.split(" ", 1)[0] for ln in lines]
    for stamp in stamps:  # ISO 8601, UTC, milliseconds
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
    bodies = [ln.split(" ", 1)[1] for ln in lines]
    assert len(lines) == 4 and bodies[:2] == bodies[2:]
    assert bodies[1].endswith("]: ACTION=serial-reject EPOCH=7 PEER=1.2.3.4")
    assert bodies[0].startswith("ced-test[")


@pytest.mark.usefixtures("restore_logfmt")
def test_direct_syslog_sink_sends_what_sysloghandler_sends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log"
    monkeypatch.setattr(logfmt, "SYSLOG_SOCKET", str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        srv.settimeout(5)
        _emit_both_ways("ced-test", "syslog")
        got = [srv.recv(4096) for _ in range(4)]
    assert got[:2] == got[2:]
    assert got[0].startswith(b"<30>ced-test[") and got[0].endswith(b'REASON="two words" SCRIPT=s\0')
    assert got[1].startswith(b"<28>ced-test[")  # daemon.warning


@pytest.mark.usefixtures("restore_logfmt")
def test_direct_sink_falls_back_to_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(logfmt, "SYSLOG_SOCKET", str(tmp_path / "none"))
    logfmt.setup("ced-test", "syslog", queued=False)
    logfmt.event("run", script="s")
    assert capfd.readouterr().err.endswith("]: ACTION=run SCRIPT=s\n")


def test_direct_sink_does_not_import_logging() -> None:
    code = ("import sys; from agent.common import logfmt; logfmt.setup('x', 'stderr', queued=False); "
            "logfmt.event('a', logfmt.WARNING); print('logging' in sys.modules)")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT)  # fmt: skip
    assert p.stdout.strip() == "False" and p.stderr.endswith("]: ACTION=a\n")


@pytest.mark.usefixtures("restore_logfmt")
@pytest.mark.parametrize("queued", [True, False])
def test_json_lines(capfd: pytest.CaptureFixture[str], queued: bool) -> None:
    logfmt.setup("ced-test", "stderr", logfmt.INFO, queued=queued, fmt="json")
    try:
        with logfmt.context(epoch=7, reqid="r1"):
            logfmt.event("run", logfmt.WARNING, script="s", ident="spoof", ok=True, n=None)
        if queued:
            import logging

            logging.getLogger("ctrl-exec.cluster").error("free\ntext")
    finally:
        logfmt.shutdown()
        logfmt.setup("ced-test", "stderr", queued=False)  # back to KEY=value for the others
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == (2 if queued else 1), lines
    doc = json.loads(lines[0])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc.pop("ts"))
    assert isinstance(doc.pop("pid"), int)
    assert doc == {"level": "warning", "ident": "ced-test", "action": "run", "epoch": 7,
                   "reqid": "r1", "script": "s", "field_ident": "spoof", "ok": True,
                   "n": None}  # fmt: skip
    if queued:
        free = json.loads(lines[1])
        assert (free["action"], free["logger"], free["msg"]) == ("log", "ctrl-exec.cluster",
                                                                "free\ntext")  # fmt: skip


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format must be one of kv, json"):
        logfmt.setup("x", "stderr", queued=False, fmt="yaml")


# ----- the request's reqid on every line ----------------------------------------------------


@pytest.mark.usefixtures("restore_logfmt")
@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_every_line_of_a_request_carries_its_reqid(
    capfd: pytest.CaptureFixture[str], fmt: str
) -> None:
    """Events, free text of the project's loggers and of adopted libraries (in another
    thread's formatter), and a line with a reqid of its own (kept, the request's as
    REQUEST) all carry the request's reqid; a line logged outside the request does not."""
    import threading

    logfmt.setup("api-test", "stderr", logfmt.INFO, fmt=fmt)
    try:
        assert logfmt.current_reqid() == ""
        with logfmt.request("00112233aabbccdd", identity="alice"):
            assert logfmt.current_reqid() == "00112233aabbccdd"
            logfmt.event("auth", result="pass")
            logfmt.event("pair-approve-api", reqid="pairing-1")
            logging.getLogger("ctrl-exec.cluster").warning("free text")
            logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
            t = threading.Thread(target=lambda: logfmt.event("in-thread"))
            t.start()  # a plain thread does not copy the context: no reqid there
            t.join()
        logfmt.event("after")
    finally:
        logfmt.shutdown()
        logfmt.setup("ced-test", "stderr", queued=False)
    lines = capfd.readouterr().err.splitlines()
    got = []
    for line in lines:
        if fmt == "json":
            doc = json.loads(line)
            got.append((doc["action"], {k.upper(): str(v) for k, v in doc.items()}))
        else:
            action, fields = logfmt.parse_line(line.split("]: ", 1)[1])
            got.append((action, fields))
    by = {a if a != "log" else f["LOGGER"]: f for a, f in got}
    assert set(by) == {"auth", "pair-approve-api", "ctrl-exec.cluster", "uvicorn.error",
                       "in-thread", "after"}, lines  # fmt: skip
    for name in ("auth", "ctrl-exec.cluster", "uvicorn.error"):
        assert by[name]["REQID"] == "00112233aabbccdd", by[name]
        assert by[name]["IDENTITY"] == "alice", by[name]
    assert by["pair-approve-api"]["REQID"] == "pairing-1"
    assert by["pair-approve-api"]["REQUEST"] == "00112233aabbccdd"
    assert "REQID" not in by["after"] and "REQID" not in by["in-thread"]
