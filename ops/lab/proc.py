"""Processes of the lab: wait for a condition, stop a child by its PID, find processes by
parent or session, and run one ``ctrl-exec-api`` instance (:class:`ApiProcess`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ops.lab.net import http_get

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))  # a child's environment: this repository first
API_DAEMON = (sys.executable, "-m", "dispatcher.api.daemon")


class WaitTimeout(AssertionError):
    """A condition did not come true in time (in a test: an assertion failure)."""


def wait_until(
    cond: Callable[[], Any], timeout: float, what: str, step: float = 0.02,
    error: Callable[[str], Exception] = WaitTimeout,
) -> Any:  # fmt: skip
    """Poll ``cond`` until it returns something true (returned), at most ``timeout`` s;
    then raise ``error`` (a :class:`WaitTimeout` unless told otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def terminate(p: subprocess.Popen[bytes] | None, grace: float = 10) -> int | None:
    """Stop a child by its PID: SIGCONT (in case it was stopped) and SIGTERM, SIGKILL after
    ``grace`` s. Its exit status; None if it had to be killed or never started."""
    if p is None:
        return None
    if p.poll() is None:
        p.send_signal(signal.SIGCONT)
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
            return None
    return p.returncode


def processes() -> Iterator[tuple[int, list[str]]]:
    """``(pid, fields)`` of every process, ``fields`` being ``/proc/PID/stat`` after the
    command name: ``fields[1]`` is the parent's PID, ``fields[3]`` the session id."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), stat[stat.rfind(")") + 2 :].split()


class ApiProcess:
    """One ``ctrl-exec-api`` process started from its config file, its stderr appended to
    its log. A mixin for a dataclass with these fields:"""

    name: str
    config: Path
    log: Path
    health_port: int
    proc: subprocess.Popen[bytes] | None

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, command: Sequence[str] = API_DAEMON, env: Mapping[str, str] = ENV) -> None:
        """``command --config CONFIG`` in its own session."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*command, "--config", str(self.config)], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log, env=dict(env), start_new_session=True,
            )  # fmt: skip

    def wait_healthy(self, timeout: float = 20, path: str = "/health") -> None:
        """Wait until its health port answers ``GET path`` with 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                rc = self.proc.returncode if self.proc else "(never started)"
                raise RuntimeError(f"{self.name} exited {rc}: {self.logtext()[-3000:]}")
            if http_get(f"{self.health_url}{path}", 0.5)[0] == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not healthy ({path}): {self.logtext()[-3000:]}")

    def signal(self, sig: int) -> float:
        """Send ``sig``; the monotonic time it was sent."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        t = time.monotonic()
        os.kill(self.proc.pid, sig)
        return t

    def stop(self, grace: float = 20) -> int | None:
        """SIGTERM (it drains and resigns), SIGKILL after ``grace`` s: its exit status."""
        return terminate(self.proc, grace)

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
