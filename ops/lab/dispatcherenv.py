"""A dispatcher instance (CA, cert, config, registry) plus real agents that trust it.

The CA is made by ``dispatcher.pki.ca`` (as ``setup-ca`` would); agent certificates are
signed by that same CA so the dispatcher and the agents verify each other.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from dispatcher.config import DispatcherConfig
from dispatcher.core import Dispatcher
from dispatcher.pki import ca as pki
from dispatcher.statewrite import LocalWriter
from ops.lab.agentproc import AgentProc, make_agent
from ops.lab.pki import Issued, TestCA

DISPATCHER_ID = "disp-test"


class DispatcherCA(TestCA):
    """A TestCA whose key and cert are the dispatcher CA's (``dispatcher.pki.ca``)."""

    def __init__(self, ca: pki.CA, directory: Path) -> None:  # no super(): reuse the CA
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ca.key  # type: ignore[assignment]
        self.cert = ca.cert
        self.cert_path = ca.cert_path


class RecordingWriter(LocalWriter):
    """LocalWriter that records every path it touches and can slow each write down."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.log: list[tuple[str, str]] = []

    def write(self, path: str | Path, data: bytes | str, mode: int = 0o644) -> None:
        super().write(path, data, mode)
        self.log.append(("write", str(path)))
        if self.delay:
            time.sleep(self.delay)

    def delete(self, path: str | Path) -> bool:
        self.log.append(("delete", str(path)))
        return super().delete(path)

    def index(self, op: str, path: str | Path) -> int:
        return self.log.index((op, str(path)))


@dataclass
class DispatcherEnv:
    root: Path
    d: Dispatcher
    ca: DispatcherCA
    writer: RecordingWriter
    original: Issued  # a copy of the first dispatcher cert/key, kept outside ca_dir
    agents: dict[str, AgentProc] = field(default_factory=dict)

    @property
    def installed(self) -> Issued:
        """Whatever cert/key is installed at cfg.cert / cfg.key (read at each use)."""
        return Issued(Path(self.d.cfg.cert), Path(self.d.cfg.key), 0)

    def add_agent(self, name: str, *, start: bool = True, days: int = 825,
                  serial: str | None = None) -> AgentProc:  # fmt: skip
        """A real agent reporting ``hostname = name``, trusting the installed dispatcher cert,
        registered under ``name`` with its cert valid for ``days``."""
        cfg = self.d.cfg
        disp = Issued(Path(cfg.cert), Path(cfg.key), int(pki.cert_serial_hex(cfg.cert), 16))
        agent = make_agent(self.root / "agents" / name, self.ca, {DISPATCHER_ID: disp},
                           {"true": "/bin/true"}, extra={"hostname": name})  # fmt: skip
        if days != 825:  # re-issue the agent cert in place with a shorter life
            agent.agent_cert = self.ca.issue(agent.agent_cert.cert.stem, cn=name, days=days)
        expiry = pki.cert_not_after(agent.agent_cert.cert.read_bytes())
        self.d.registry.register(name, ip=agent.host, port=agent.port, lookup_by="ip",
                                 expiry=expiry,
                                 dispatcher_serial=serial or disp.serial_hex)  # fmt: skip
        self.agents[name] = agent
        if start:
            agent.start()
        return agent

    def stop_all(self) -> None:
        for a in self.agents.values():
            a.stop()


def make_env(root: Path, delay: float = 0.0, **cfg_overrides: object) -> DispatcherEnv:
    """CA + dispatcher cert under ``root/ca``, state under ``root/state``."""
    ca_dir, state = root / "ca", root / "state"
    ca = pki.create_ca(ca_dir)
    cfg = DispatcherConfig(path=str(root / "ctrl-exec.conf"), ca_dir=str(ca_dir),
                           state_dir=str(state), dispatcher_id=DISPATCHER_ID,
                           read_timeout=10.0)  # fmt: skip
    for k, v in cfg_overrides.items():
        setattr(cfg, k, v)
    cfg.finish()
    cert = pki.issue_dispatcher_cert(ca, cfg.cert, cfg.key)
    keep = root / "original"
    keep.mkdir()
    shutil.copy(cfg.cert, keep / "dispatcher.crt")
    shutil.copy(cfg.key, keep / "dispatcher.key")
    original = Issued(keep / "dispatcher.crt", keep / "dispatcher.key", cert.serial_number)
    writer = RecordingWriter(delay)
    d = Dispatcher(cfg, writer=writer)
    return DispatcherEnv(root, d, DispatcherCA(ca, root / "agent-certs"), writer, original)
