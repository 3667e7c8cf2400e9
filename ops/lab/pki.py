"""A throwaway CA for tests and benches, built directly on ``cryptography``.

Independent of ``dispatcher.pki.ca`` on purpose, so the agent is not tested only against the
dispatcher's own signer.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.common.serial import new_serial


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Issued:
    cert: Path
    key: Path
    serial: int

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


class TestCA:
    __test__ = False

    def __init__(self, directory: Path, cn: str = "ctrl-exec CA"):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(new_serial())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = self.dir / "ca.crt"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def sign_public_key(
        self,
        public_key: object,
        cn: str,
        days: int = 825,
        serial: int | None = None,
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        start = not_before or now - dt.timedelta(minutes=5)
        return (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(serial or new_serial())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        name: str,
        cn: str | None = None,
        serial: int | None = None,
        rsa_bits: int = 0,
        days: int = 825,
    ) -> Issued:
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if rsa_bits:
            key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        cert = self.sign_public_key(key.public_key(), cn or name, days=days, serial=serial)
        cp, kp = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kp.write_bytes(_key_pem(key))
        kp.chmod(0o600)
        return Issued(cp, kp, cert.serial_number)

    def sign_csr_pem(self, csr_pem: str | bytes, days: int = 365) -> str:
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        csr = x509.load_pem_x509_csr(data)
        cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        cert = self.sign_public_key(csr.public_key(), str(cn), days=days)
        return cert.public_bytes(serialization.Encoding.PEM).decode()
