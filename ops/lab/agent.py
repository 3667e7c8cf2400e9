"""A real agent of the lab that pairs through the real CLI (the demo and the runbook lab).

:class:`PairingAgent` writes the agent's config and allowlist under its own directory,
gives the ``ctrl-exec-agent request-pairing`` and ``serve`` arguments, reads what
``request-pairing --background`` printed (its pairing code; the request id on its last
line) and tells when the agent has stored what an approval delivers.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

PAIRED_FILES = ("agent.crt", "ca.crt", "state/ctrl-exec-dispatchers")


@dataclass
class PairingAgent:
    name: str  # its hostname, and the name it is registered under
    addr: str
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    reqid: str = ""
    code: str = ""

    @property
    def conf(self) -> Path:
        return self.dir / "agent.conf"

    @property
    def allowlist(self) -> Path:
        return self.dir / "scripts.conf"

    @property
    def pairing_out(self) -> Path:
        """request-pairing's stdout (its stderr goes to ``pairing.log``)."""
        return self.dir / "pairing.out"

    def write(self, scripts: str, extra: str = "") -> PairingAgent:
        """Its config (``extra`` appended: a ``[tags]`` section) and allowlist."""
        d = self.dir
        (d / "state").mkdir(parents=True)
        self.conf.write_text(
            f"port = {self.port}\nbind = {self.addr}\ncert = {d}/agent.crt\nkey = {d}/agent.key\n"
            f"ca = {d}/ca.crt\nstate_dir = {d}/state\nhostname = {self.name}\n"
            f"log_target = stderr\nkey_type = ec-p256\nrevoked_serials = {d}/revoked\n{extra}"
        )
        self.allowlist.write_text(scripts)
        return self

    def request_pairing_args(self, port: int) -> list[str]:
        """``ctrl-exec-agent`` arguments: ask the pairing port ``port`` on 127.0.0.1."""
        return ["request-pairing", "--config", str(self.conf), "--dispatcher", "127.0.0.1",
                "--port", str(port), "--background", "--timeout", "60"]  # fmt: skip

    def serve_args(self) -> list[str]:
        return ["serve", "--config", str(self.conf), "--allowlist", str(self.allowlist)]

    def read_pairing(self, rc: int) -> str | None:
        """Take ``reqid`` and ``code`` from what request-pairing printed; what went wrong
        (None: nothing) when it exited ``rc`` != 0."""
        printed = self.pairing_out.read_text()
        if rc != 0:
            return (f"{self.name}: request-pairing exited {rc}: {printed}"
                    f"{(self.dir / 'pairing.log').read_text()}")  # fmt: skip
        lines = [ln.strip() for ln in printed.splitlines() if ln.strip()]
        self.reqid = lines[-1]
        self.code = next((ln.split(":", 1)[1].strip() for ln in lines
                          if ln.startswith("Pairing code:")), "")  # fmt: skip
        return None

    @property
    def paired(self) -> bool:
        """It stored its certificate, the CA and the dispatcher it trusts."""
        return all((self.dir / f).exists() for f in PAIRED_FILES)
