"""Start a real etcd (1 or 3 members) on free loopback ports (tests, demo, runbooks).

Every member gets its own data dir under ``root``, ``--pre-vote``, ``--logger=zap`` and a
fresh ``--initial-cluster-token``. Members are stopped with SIGKILL by PID (a SIGTERM of a
whole cluster can take ~7 s), and :meth:`EtcdCluster.stop_member` /
:meth:`EtcdCluster.start_member` let a test take one member down and bring it back on its
data dir; :meth:`EtcdCluster.pause` / :meth:`EtcdCluster.resume` freeze and thaw every
member at once (SIGSTOP/SIGCONT: the whole store stops answering, clients time out).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ops.lab.net import free_port

ETCD = shutil.which("etcd")
SKIP_REASON = "etcd is not installed (apt-get install etcd-server); CI installs it"


@dataclass(frozen=True)
class TLSFiles:
    """Server cert/key (serverAuth and clientAuth: the 3.4 gateway dials itself with it),
    the CA clients must present certs from, and a client cert/key for health checks."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    scheme: str = "http"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def settings(self, initial_cluster: str, token: str, state: str) -> dict[str, str]:
        """This member's etcd settings (``--KEY VALUE`` on the command line, ``KEY: VALUE``
        in a config file), besides pre-vote and logging."""
        return {
            "name": self.name, "data-dir": str(self.data_dir),
            "listen-client-urls": self.client_url, "advertise-client-urls": self.client_url,
            "listen-peer-urls": self.peer_url, "initial-advertise-peer-urls": self.peer_url,
            "initial-cluster": initial_cluster, "initial-cluster-token": token,
            "initial-cluster-state": state,
        }  # fmt: skip


class EtcdCluster:
    def __init__(self, root: Path, size: int = 1, tls: TLSFiles | None = None) -> None:
        if ETCD is None:
            raise RuntimeError(SKIP_REASON)
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.token = f"ctrl-exec-lab-{secrets.token_hex(6)}"
        self.members = [
            Member(
                name=f"m{i}",
                client_port=free_port(),
                peer_port=free_port(),
                data_dir=root / f"m{i}.data",
                log=root / f"m{i}.log",
                scheme="https" if tls else "http",
            )
            for i in range(1, size + 1)
        ]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, timeout: float = 20.0) -> EtcdCluster:
        for m in self.members:
            self._spawn(m, state="new")
        self.wait_healthy(self.members, timeout)
        return self

    def _spawn(self, m: Member, state: str) -> None:
        assert ETCD is not None
        argv = [ETCD]
        for key, value in m.settings(self.initial_cluster, self.token, state).items():
            argv += [f"--{key}", value]
        argv += ["--pre-vote", "--logger=zap", "--log-outputs=stderr"]
        if self.tls is not None:
            argv += [
                "--cert-file", str(self.tls.server_cert),
                "--key-file", str(self.tls.server_key),
                "--trusted-ca-file", str(self.tls.ca),
                "--client-cert-auth",
            ]  # fmt: skip
        with open(m.log, "ab") as log:
            m.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_healthy(self, members: list[Member], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(members)
        ctx: ssl.SSLContext | None = None
        if self.tls is not None:
            ctx = ssl.create_default_context(cafile=str(self.tls.ca))
            ctx.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        while pending:
            m = pending[0]
            if m.proc is not None and m.proc.poll() is not None:
                raise RuntimeError(f"etcd {m.name} exited: {m.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(
                    f"{m.client_url}/health", timeout=0.5, context=ctx
                ) as r:
                    if b'"true"' in r.read():
                        pending.pop(0)
                        continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd {m.name} not healthy after {timeout} s")
            time.sleep(0.05)

    def stop_member(self, index: int) -> None:
        """SIGKILL one member (its data dir stays)."""
        m = self.members[index]
        if m.proc is not None and m.proc.poll() is None:
            os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait(10)
        m.proc = None

    def start_member(self, index: int, timeout: float = 20.0) -> None:
        """Restart a stopped member on its data dir and wait until it is healthy."""
        m = self.members[index]
        self._spawn(m, state="existing")
        self.wait_healthy([m], timeout)

    def pause(self) -> None:
        """SIGSTOP every member: etcd stops answering (connections hang until a timeout)."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                os.kill(m.proc.pid, signal.SIGSTOP)

    def resume(self, timeout: float = 20.0) -> None:
        """SIGCONT every member paused by :meth:`pause`; wait until each is healthy."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                os.kill(m.proc.pid, signal.SIGCONT)
        self.wait_healthy(self.members, timeout)

    def close(self) -> None:
        for i in range(len(self.members)):
            self.stop_member(i)
