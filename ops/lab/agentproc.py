"""Start a real ``ctrl-exec-agent serve`` process and talk raw TLS to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.common.tlsconf import client_context
from agent.common.wire import Response, parse_response, request_bytes
from ops.lab.net import free_port, wait_listening
from ops.lab.pki import Issued, TestCA
from ops.lab.proc import ENV, ROOT, terminate

__all__ = [
    "ENV",
    "ROOT",
    "AgentProc",
    "as_user",
    "body",
    "free_port",
    "make_agent",
    "user_env",
    "wait_listening",
]


@dataclass
class AgentProc:
    root: Path
    ca: TestCA
    host: str
    port: int
    agent_cert: Issued
    config: Path
    allowlist: Path
    state_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, str] = field(default_factory=dict)
    user: str | None = None  # run the agent as this user (executor mode), not as root

    @property
    def trust_map(self) -> Path:
        return self.state_dir / "ctrl-exec-dispatchers"

    def start(self, wait: bool = True) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*as_user(self.user), "-m", "agent.cli", "serve",
                 "--config", str(self.config), "--allowlist", str(self.allowlist)],
                stdout=subprocess.DEVNULL, stderr=log, env=user_env(self.user),
                start_new_session=True,
            )  # fmt: skip
        if wait:
            wait_listening(self.host, self.port, self.proc)

    def stop(self) -> None:
        terminate(self.proc)

    def hup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")

    def client_ctx(self, who: Issued | None) -> ssl.SSLContext:
        return client_context(str(self.ca.cert_path), str(who.cert) if who else None,
                              str(who.key) if who else None)  # fmt: skip

    def raw(self, data: bytes, who: Issued | None, timeout: float = 30) -> bytes:
        ctx = self.client_ctx(who)
        with (
            socket.create_connection((self.host, self.port), timeout=timeout) as raw,
            ctx.wrap_socket(raw) as s,
        ):
            s.sendall(data)
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
            except (ssl.SSLError, ConnectionResetError):
                pass
        return out

    def call(self, method: str, path: str, body: Any, who: Issued | None,
             timeout: float = 30) -> Response:  # fmt: skip
        data = self.raw(request_bytes(method, path, body, host=self.host), who, timeout)
        return parse_response(data)


def as_user(user: str | None) -> list[str]:
    """The command that starts a Python interpreter as ``user`` with its groups and no
    capabilities (this interpreter, as root, when None). As a user it is the system's
    ``/usr/bin/python3`` (see :func:`user_env`): this interpreter may live where only root
    can enter (a pyenv Python under ``/root``), and the agent must be able to start its own
    interpreter again for async jobs."""
    if user is None:
        return [sys.executable]
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
            "/usr/bin/python3"]  # fmt: skip


def user_env(user: str | None) -> dict[str, str]:
    """The environment for :func:`as_user`: this repository and, for the system Python,
    this environment's site-packages (``cryptography``) on its path."""
    if user is None:
        return ENV
    import site

    return dict(ENV, PYTHONPATH=os.pathsep.join([str(ROOT), *site.getsitepackages()]))


@contextmanager
def running_agents(agents: Sequence[AgentProc]) -> Iterator[Sequence[AgentProc]]:
    """Start every agent (at once), wait until each listens; stop them all on the way out."""
    try:
        for a in agents:
            a.start(wait=False)
        for a in agents:
            wait_listening(a.host, a.port, a.proc)
        yield agents
    finally:
        for a in agents:
            a.stop()


def make_agent(tmp: Path, ca: TestCA, dispatchers: dict[str, Issued], scripts: dict[str, str],
               host: str = "127.0.0.1", extra: dict[str, str] | None = None,
               allowlist_extra: str = "") -> AgentProc:  # fmt: skip
    """Config, allowlist, trust map and certs for one agent under ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    agent_cert = ca.issue(f"agent-{port}", cn="agent.test")
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    lines = ["# ctrl-exec trusted dispatchers"]
    lines += [f"{who.serial_hex} {ident}" for ident, who in dispatchers.items()]
    (state / "ctrl-exec-dispatchers").write_text("\n".join(lines) + "\n")
    conf = {
        "port": str(port), "bind": host, "cert": str(agent_cert.cert), "key": str(agent_cert.key),
        "ca": str(ca.cert_path), "state_dir": str(state), "revoked_serials": str(tmp / "revoked"),
        "rate_limit_disable": "1", "log_target": "stderr", "hostname": "agent.test",
    }  # fmt: skip
    conf.update(extra or {})
    config = tmp / "agent.conf"
    config.write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
    allow = tmp / "scripts.conf"
    allow.write_text("".join(f"{n} = {p}\n" for n, p in scripts.items()) + allowlist_extra)
    return AgentProc(tmp, ca, host, port, agent_cert, config, allow, state, tmp / "agent.log")


def body(resp: Response) -> dict[str, Any]:
    obj = json.loads(resp.body)
    assert isinstance(obj, dict)
    return obj
