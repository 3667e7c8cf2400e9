"""A real ``ctrl-exec-executor`` process, throwaway users, and raw calls on its socket."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.executor import protocol
from ops.lab.proc import ENV, terminate, wait_until


@dataclass
class ExecutorProc:
    config: Path
    allowlist: Path
    socket: Path
    agent_user: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.executor.cli", "--config", str(self.config),
                 "--allowlist", str(self.allowlist), "--agent-user", self.agent_user],
                stdout=subprocess.DEVNULL, stderr=log, env=ENV, start_new_session=True,
            )  # fmt: skip
        wait_until(lambda: self.socket.exists() or self.proc.poll() is not None, 15,  # type: ignore[union-attr]
                   "the executor socket")  # fmt: skip
        if self.proc.poll() is not None:
            raise RuntimeError(f"executor exited {self.proc.returncode}: {self.logtext()}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        return terminate(self.proc)

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def as_euid(uid: int) -> Iterator[None]:
    """Run the block with this effective uid (root again afterwards): the kernel records
    the euid of a Unix socket's peer at connect(), which is what SO_PEERCRED reports."""
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


def raw_exchange(sock_path: Path, data: bytes, uid: int, timeout: float = 20) -> bytes:
    """Connect as ``uid``, send ``data``, close the sending side, read to EOF."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        with as_euid(uid):
            s.connect(str(sock_path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out
    finally:
        s.close()


def decode_reply(data: bytes) -> dict[str, Any]:
    (size,) = struct.unpack(">I", data[:4])
    assert len(data) == 4 + size, f"reply of {len(data)} bytes announces {size}"
    obj = json.loads(data[4:])
    assert isinstance(obj, dict)
    return obj


def call(sock_path: Path, obj: dict[str, Any], uid: int, timeout: float = 20) -> dict[str, Any]:
    return decode_reply(raw_exchange(sock_path, protocol.encode(obj), uid, timeout))


def request(script: str, args: list[str] | None = None, stdin: str = "{}") -> dict[str, Any]:
    return protocol.request_obj(protocol.Request(script, args or [], stdin, "r1", "disp-a"))


@dataclass(frozen=True)
class Users:
    agent: pwd.struct_passwd  # the agent's service user
    runner: pwd.struct_passwd  # a run_as user with a supplementary group
    group: str  # that supplementary group


@contextlib.contextmanager
def throwaway_users(tag: str) -> Iterator[Users]:
    """Create ``cx<tag>a`` (agent), ``cx<tag>r`` (run_as, in group ``cx<tag>g``); remove
    them afterwards."""
    agent, runner, group = f"cx{tag}a", f"cx{tag}r", f"cx{tag}g"
    nologin = "/usr/sbin/nologin"
    made: list[list[str]] = []
    try:
        for cmd, undo in (
            (["groupadd", "--system", group], ["groupdel", group]),
            (["useradd", "--system", "--user-group", "--no-create-home", "--shell", nologin,
              agent], ["userdel", agent]),
            (["useradd", "--system", "--user-group", "--no-create-home", "--shell", nologin,
              "--groups", group, runner], ["userdel", runner]),
        ):  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, timeout=30)
            made.append(undo)
        yield Users(pwd.getpwnam(agent), pwd.getpwnam(runner), group)
    finally:
        for undo in reversed(made):
            subprocess.run(undo, capture_output=True, timeout=30)
