"""A ``ctrl-exec-api`` daemon started from its own config file, and the CA it trusts.

Shared by the API tests (``tests/integration/test_api.py``, ``test_api_proxy.py``):
:func:`make_daemon` writes an instance config under a directory the caller owns (free
loopback ports) and returns a :class:`Daemon` to ``start()``, ``wait_healthy()`` and
``stop()`` (by PID).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dispatcher.pki import ca as dpki
from ops.lab.dispatcherenv import DispatcherCA
from ops.lab.net import free_port
from ops.lab.pki import Issued
from ops.lab.proc import ApiProcess


class PairingCA(DispatcherCA):
    """A new dispatcher CA (dispatcher.pki.ca) in ``directory``, behind TestCA's interface.

    ``issue`` goes through a CSR signed by ``dispatcher.pki.ca.sign_csr``, as pairing does.
    """

    def __init__(self, directory: Path) -> None:
        self.ca = dpki.create_ca(directory)
        super().__init__(self.ca, directory)

    def issue(self, name: str, cn: str | None = None, serial: int | None = None,
              rsa_bits: int = 0, days: int = 825) -> Issued:  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or name)]))
            .sign(key, hashes.SHA256())
        )
        pem = dpki.sign_csr(self.ca, csr.public_bytes(serialization.Encoding.PEM).decode(), days)
        cp, kp = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cp.write_text(pem)
        kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))  # fmt: skip
        kp.chmod(0o600)
        return Issued(cp, kp, x509.load_pem_x509_certificate(pem.encode()).serial_number)


@dataclass
class Daemon(ApiProcess):
    name: str
    config: Path
    log: Path
    api_port: int
    health_port: int
    tls: bool
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.api_port}"


def make_daemon(tmp: Path, name: str, ca_dir: Path, registry_dir: Path,
                extra: dict[str, str]) -> Daemon:  # fmt: skip
    state = tmp / f"state-{name}"
    state.mkdir()
    api_port, health_port = free_port(), free_port()
    conf = {
        "ca_dir": str(ca_dir), "state_dir": str(state), "registry_dir": str(registry_dir),
        "api_bind": "127.0.0.1", "api_port": str(api_port), "health_bind": "127.0.0.1",
        "health_port": str(health_port), "log_target": "stderr", "read_timeout": "20",
        # no instance_id or lease_ttl: cluster keys, an error without etcd_endpoints
    }  # fmt: skip
    conf.update(extra)
    config = tmp / f"{name}.conf"
    config.write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
    return Daemon(name, config, tmp / f"{name}.log", api_port, health_port, "api_cert" in extra)
