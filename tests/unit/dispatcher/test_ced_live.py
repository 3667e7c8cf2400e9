"""``ced run``/``ping`` output while hosts finish: outcomes, callback, NDJSON, progress,
recap, ``-o DIR`` (dispatcher/ced/live.py, the fan-out's completion callback)."""

from __future__ import annotations

import io
import json
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dispatcher.ced.live import Live, progress_wanted, recap, rtt_ms, show_run
from dispatcher.client import fanout
from dispatcher.client.blocking import BlockingIO
from dispatcher.client.io import run_blocking
from dispatcher.client.wire import AgentReply, AgentRequest
from dispatcher.operations import count_outcomes
from dispatcher.registry import Target

Result = dict[str, Any]

# ----- outcomes and the completion callback (an in-memory AgentIO) -----------------------


class FakeAgents(BlockingIO):
    """Each host answers after its own delay with a canned reply (on the fan-out's loop,
    as ``ced``)."""

    def __init__(self, replies: dict[str, tuple[float, AgentReply]]) -> None:
        self.replies = replies

        async def call(req: AgentRequest) -> AgentReply:
            delay, reply = self.replies[req.name]
            await self.sleep(delay)
            return reply

        self.call = call  # type: ignore[method-assign]


def _reach(agents: FakeAgents, parallel: int = 8) -> fanout.Reach:
    return fanout.Reach(ssl.create_default_context(), 5.0, parallel, io=agents)


def _targets(*names: str) -> list[Target]:
    return [Target(n, "127.0.0.1", 1) for n in names]


def test_run_outcomes_and_completion_order() -> None:
    agents = FakeAgents({
        "slow": (0.4, AgentReply(200, {"exit": 0, "stdout": "s\n"}, 400)),
        "fast": (0.0, AgentReply(200, {"exit": 0, "stdout": "f\n"}, 1)),
        "bad": (0.1, AgentReply(200, {"exit": 3}, 100)),
        "gone": (0.0, AgentReply(None, None, 2, "host 'x' did not respond - connection refused")),
        "nope": (0.0, AgentReply(200, {"exit": -1, "error": "script not permitted"}, 3)),
        "403": (0.0, AgentReply(403, {"error": "serial mismatch"}, 3, "forbidden: serial mismatch")),
    })  # fmt: skip
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def on_result(r: Result, outcome: str) -> None:
        with lock:
            seen.append((r["host"], outcome))

    names = ["slow", "fast", "bad", "gone", "nope", "403"]
    results = run_blocking(fanout.run_all(_targets(*names), "s", [], "r1", "", "", _reach(agents),
                                          on_result=on_result))  # fmt: skip
    assert [r["host"] for r in results] == names  # the returned list keeps target order
    assert dict(seen) == {"slow": "ok", "fast": "ok", "bad": "failed", "gone": "unreachable",
                          "nope": "denied", "403": "denied"}  # fmt: skip
    assert seen[-1][0] == "slow" and seen.index(("bad", "failed")) > seen.index(("fast", "ok"))
    assert count_outcomes([o for _, o in seen]) == {
        "ok": 2, "failed": 1, "unreachable": 1, "denied": 2, "locked": 0, "unknown": 0}  # fmt: skip


def test_async_busy_is_locked_and_ping_outcomes() -> None:
    agents = FakeAgents({
        "a": (0.0, AgentReply(202, {"status": "accepted"}, 1)),
        "b": (0.0, AgentReply(409, {"status": "busy", "error": "script already running"}, 1,
                              "409 Conflict")),
    })  # fmt: skip
    seen: dict[str, str] = {}
    run_blocking(fanout.run_all(_targets("a", "b"), "s", [], "r", "", "", _reach(agents),
                                async_=True, on_result=lambda r, o: seen.update({r["host"]: o})))  # fmt: skip
    assert seen == {"a": "ok", "b": "locked"}
    agents = FakeAgents({
        "up": (0.0, AgentReply(200, {"status": "ok"}, 1)),
        "down": (0.0, AgentReply(None, None, 1, "host 'x' did not respond")),
    })  # fmt: skip
    seen.clear()
    run_blocking(fanout.ping_all(_targets("up", "down"), "r", _reach(agents),
                                 on_result=lambda r, o: seen.update({r["host"]: o})))  # fmt: skip
    assert seen == {"up": "ok", "down": "unreachable"}


def test_an_exception_in_one_host_is_reported_as_failed() -> None:
    agents = FakeAgents({"ok": (0.0, AgentReply(200, {"exit": 0}, 1))})
    real = agents.call

    async def call(req: AgentRequest) -> AgentReply:
        if req.name == "boom":
            raise RuntimeError("kaput")
        return await real(req)

    agents.call = call  # type: ignore[method-assign]
    seen: dict[str, str] = {}
    res = run_blocking(fanout.run_all(_targets("ok", "boom"), "s", [], "r", "", "",
                                      _reach(agents), on_result=lambda r, o: seen.update({r["host"]: o})))  # fmt: skip
    assert seen == {"ok": "ok", "boom": "failed"}
    assert res[1]["error"] == "internal error: kaput" and res[1]["exit"] == -1


# ----- the printer -----------------------------------------------------------------------


def _r(host: str, code: int, rtt: int, **extra: Any) -> Result:
    return {"host": host, "script": "s", "exit": code, "rtt": f"{rtt}ms", "reqid": "r", **extra}


def test_ndjson_one_object_per_host_with_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    live = Live(ndjson=True)
    live.expect(2)
    live(_r("b", 0, 5, stdout="x\n"), "ok")
    live(_r("a", 1, 9), "failed")
    live.close()
    lines = capsys.readouterr().out.splitlines()
    docs = [json.loads(line) for line in lines]
    assert [(d["host"], d["outcome"], d["exit"]) for d in docs] == [
        ("b", "ok", 0),
        ("a", "failed", 1),
    ]
    assert docs[0]["stdout"] == "x\n"


def test_text_results_stream_and_progress_lines(capsys: pytest.CaptureFixture[str]) -> None:
    bar = io.StringIO()  # not a TTY: one progress line per update, no escapes
    clock = iter([0.0, 1.5, 2.5, 3.0]).__next__
    live = Live(show=show_run, progress=bar, clock=clock)
    live.expect(3)
    live(_r("web2", 0, 12, stdout="hello\n"), "ok")
    live(_r("web1", 2, 30), "failed")
    live.close()
    out = capsys.readouterr().out
    assert out.index("==> web2  [OK  exit:0  12ms") < out.index("==> web1  [FAIL  exit:2  30ms")
    assert "hello\n" in out
    assert bar.getvalue().splitlines() == [
        "[0/3] ok 0  failed 0  unreachable 0  elapsed 1.5s",
        "[1/3] ok 1  failed 0  unreachable 0  elapsed 2.5s",
        "[2/3] ok 1  failed 1  unreachable 0  elapsed 3.0s",
    ]
    assert "\x1b" not in bar.getvalue()


def test_progress_on_a_tty_rewrites_one_line() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = Tty()
    live = Live(progress=bar, clock=lambda: 0.0)
    live.expect(1)
    live(_r("a", 0, 1), "ok")
    live.close()
    text = bar.getvalue()
    assert live._ticker is not None and not live._ticker.is_alive()  # stopped by close
    assert text.count("\r\x1b[K") >= 2 and text.endswith(
        "[1/1] ok 1  failed 0  unreachable 0  elapsed 0.0s\n"
    )


def test_progress_wanted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CED_PROGRESS", "1")
    assert progress_wanted(io.StringIO())
    monkeypatch.setenv("CED_PROGRESS", "0")
    assert not progress_wanted(io.StringIO())
    monkeypatch.delenv("CED_PROGRESS")
    assert not progress_wanted(io.StringIO())


def test_recap_counts_hosts_not_ok_and_slowest() -> None:
    done = [
        (_r("web1", 0, 120), "ok"), (_r("web2", 0, 4000), "ok"), (_r("web3", 1, 50), "failed"),
        (_r("web4", -1, 3000, error="x"), "unreachable"), (_r("web5", -1, 7), "denied"),
        ({"host": "ghost", "status": "unknown", "rtt": "0ms"}, "unknown"),
    ]  # fmt: skip
    counts = count_outcomes([o for _, o in done])
    lines = recap(done, counts, 4.25)
    assert lines[0] == ("--- 6 hosts in 4.2s: 2 ok, 1 failed, 1 unreachable, 1 denied, 0 locked, "
                        "1 unknown")  # fmt: skip
    assert "failed: web3" in lines and "unreachable: web4" in lines and "unknown: ghost" in lines
    assert lines[-1] == "slowest: web2 (4000ms), web4 (3000ms), web1 (120ms)"
    assert rtt_ms({"rtt": "12ms"}) == 12 and rtt_ms({}) == -1


def test_recap_lists_at_most_ten_names() -> None:
    done = [(_r(f"h{i:02d}", 1, i), "failed") for i in range(13)]
    lines = recap(done, count_outcomes(["failed"] * 13), 1.0)
    assert lines[1].endswith("h09 (and 3 more)")


def test_output_dir_files(tmp_path: Path) -> None:
    outdir = tmp_path / "out" / "run1"
    live = Live(outdir=str(outdir))
    assert not outdir.exists()  # made on the first result only
    live(_r("web1", 0, 1, stdout="line1\nline2\n", stderr="warn\n"), "ok")
    live(_r("web2", -1, 1, error="host 'web2' did not respond"), "unreachable")
    live({"host": "../escape", "status": "unknown", "rtt": "0ms"}, "unknown")
    live.close()
    assert (outdir / "web1.stdout").read_text() == "line1\nline2\n"
    assert (outdir / "web1.stderr").read_text() == "warn\n"
    assert (outdir / "web1.exit").read_text() == "0\n"
    assert (outdir / "web2.stderr").read_text() == "ERROR: host 'web2' did not respond\n"
    assert (outdir / "web2.exit").read_text() == "-1\n"
    assert sorted(p.name for p in outdir.iterdir()) == [
        "web1.exit", "web1.stderr", "web1.stdout", "web2.exit", "web2.stderr", "web2.stdout"]  # fmt: skip
    assert not (tmp_path / "out" / "escape.stdout").exists()


def test_a_failed_write_is_raised_once_at_close(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    (tmp_path / "d").symlink_to(blocker)  # not a directory: every write fails
    live = Live(outdir=str(tmp_path / "d"))
    live(_r("web1", 0, 1), "ok")
    live(_r("web2", 0, 1), "ok")
    assert live.counts["ok"] == 2  # still counted
    with pytest.raises(OSError):
        live.close()


def test_the_tty_ticker_redraws_elapsed_while_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("dispatcher.ced.live.TICK_S", 0.05)
    bar = Tty()
    live = Live(progress=bar)
    live.expect(1)
    deadline = time.monotonic() + 5
    while bar.getvalue().count("[0/1]") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    live.close()
    assert bar.getvalue().count("[0/1]") >= 3  # redrawn with no host finished
