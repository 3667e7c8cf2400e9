"""Run ``ced`` through its command server (:mod:`dispatcher.ced.cmdserver`): tests, bench.

A :class:`Served` owns a private ``XDG_RUNTIME_DIR``, so its server is the test's alone,
started by the first command (``CED_SERVER=1``: tests have no terminal) and stopped at the
end. :func:`log_pids` reads which process logged a command's lines: the ``ced`` process
itself when it ran the command, a child of the server when the server did.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from dispatcher.ced.cmdserver import running_pid, stop
from ops.lab.proc import ROOT

CED = Path(sys.executable).parent / "ced"
LOG_PID = re.compile(r"ctrl-exec-dispatcher\[(\d+)\]")


def ced_cmd() -> list[str]:
    return [str(CED)] if CED.exists() else [sys.executable, "-m", "dispatcher.ced"]


def ced_python() -> str:
    """The interpreter ``ced`` runs on (its script's ``#!``): part of the server's key."""
    if CED.exists():
        first = CED.read_text().splitlines()[0]
        if first.startswith("#!"):
            return first[2:].strip()
    return sys.executable


def log_pids(stderr: str) -> set[int]:
    return {int(m) for m in LOG_PID.findall(stderr)}


class Served:
    def __init__(self, runtime: Path, pythonpath: Path = ROOT, idle: float = 120) -> None:
        runtime.mkdir(mode=0o700, exist_ok=True)
        self.runtime, self.pythonpath = runtime, pythonpath
        self.base = {"PATH": "/usr/bin:/bin", "USER": "tester", "PYTHONPATH": str(pythonpath),
                     "XDG_RUNTIME_DIR": str(runtime), "CED_SERVER": "1",
                     "CED_SERVER_IDLE": str(idle)}  # fmt: skip
        self.socket = self._socket_path()

    def _socket_path(self) -> str:
        code = "from dispatcher.ced.entry import socket_path; print(socket_path(make=True))"
        p = subprocess.run([ced_python(), "-P", "-c", code], env=self.base, capture_output=True,
                           text=True, check=True)  # fmt: skip
        return p.stdout.strip()

    def env(self, **extra: str) -> dict[str, str]:
        return {**self.base, **extra}

    def pid(self) -> int | None:
        return running_pid(self.socket)

    def start(self, timeout: float = 20) -> int:
        """Start the server (one ``ced --version``) and wait until it listens."""
        subprocess.run([*ced_cmd(), "--version"], env=self.base, capture_output=True, check=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.pid()
            if pid is not None and self.listening():
                return pid
            time.sleep(0.05)
        raise AssertionError("the command server did not start")

    def listening(self) -> bool:
        """A server accepts on the socket (a file left by a killed one refuses)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.socket)
            except OSError:
                return False
        return True

    def run(
        self, *args: str, stdin: str = "", cwd: Path | None = None, timeout: float = 30,
        **extra: str,
    ) -> tuple[int, subprocess.CompletedProcess[str]]:  # fmt: skip
        """(the ``ced`` process's pid, its result)."""
        proc = subprocess.Popen([*ced_cmd(), *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env(**extra), cwd=cwd)  # fmt: skip
        out, err = proc.communicate(stdin, timeout=timeout)
        return proc.pid, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def stop(self) -> None:
        assert stop(self.socket, timeout=10), "the command server did not stop"

    def __enter__(self) -> Served:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
