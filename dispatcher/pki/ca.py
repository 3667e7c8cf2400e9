"""The dispatcher's private CA (``cryptography`` only; no openssl CLI).

* ``setup-ca``: EC P-256 CA key (0600) and a self-signed CA cert, ``/CN=ctrl-exec CA``.
* Dispatcher certs: EC P-256 (the client-side handshake signature is then ~0.05 ms instead
  of ~5 ms for RSA-4096, DESIGN.md section 7); upstream 0.12.3 agents accept them.
* Agent CSRs are validated as upstream does (spec 4.4) before signing: PEM size, PEM
  header, self-signature, RSA >= 2048 (or an EC key on P-256/P-384), no MD5/SHA-1,
  optional CN binding.
* New serials are random (119+ bits) and always contain a hex letter (DESIGN.md 2).
* :func:`ca_fingerprint` (``SHA256:<hex>`` of the CA cert's DER) is what ``ced
  pairing-mode`` prints and ``ctrl-exec-agent request-pairing --ca-fingerprint`` pins.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.common.certs import ca_fingerprint as ca_fingerprint  # SHA256:<hex>, for ced
from agent.common.certs import fingerprint as fingerprint
from agent.common.certs import openssl_date
from agent.common.errors import CtrlExecError
from agent.common.serial import new_serial
from dispatcher.statewrite import LocalWriter, StateWriter

MAX_CSR_PEM = 10_240
CA_CN = "ctrl-exec CA"
DISPATCHER_CN = "ctrl-exec-dispatcher"
WEAK_HASHES = {"md2", "md4", "md5", "sha1"}


class PKIError(CtrlExecError):
    """A CA operation failed; the message is fit for an operator or the wire."""


# In a cluster instance: called before every signature with what is signed; it raises
# (only the leader signs) or records the signature. None on a single host and in ``ced``.
_sign_guard: Callable[[str], None] | None = None


def set_sign_guard(guard: Callable[[str], None] | None) -> None:
    global _sign_guard
    _sign_guard = guard


@dataclass
class CA:
    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    cert_path: Path

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def key_bytes(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_ca(ca_dir: str | Path, days: int = 3650, writer: StateWriter | None = None,
              cn: str = CA_CN) -> CA:  # fmt: skip
    """Write ``ca.key`` (0600) and ``ca.crt`` (through ``writer``, default atomic local
    writes); refuses to overwrite an existing key. A rotated CA needs its own ``cn``: TLS
    stacks look issuers up by name, so two CAs of one name in a bundle do not verify."""
    d = Path(ca_dir)
    return create_self_signed(d / "ca.key", d / "ca.crt", cn, days, writer)


def create_self_signed(
    key_path: Path, cert_path: Path, cn: str, days: int = 3650,
    writer: StateWriter | None = None,
) -> CA:  # fmt: skip
    """A new EC P-256 CA: key (0600) and self-signed cert written through ``writer``;
    refuses to overwrite an existing key (the dispatcher CA, the operator CA)."""
    key_path.parent.mkdir(parents=True, exist_ok=True)
    if key_path.exists():
        raise PKIError(f"{key_path} already exists; refusing to overwrite the CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    w = writer or LocalWriter()
    old = os.umask(0o077)
    try:
        w.write(key_path, key_bytes(key), 0o600)
    finally:
        os.umask(old)
    w.write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return CA(cert, key, cert_path)


def load_ca(
    ca_dir: str | Path, cert_path: str | Path | None = None, key_name: str = "ca.key",
    setup_verb: str = "setup-ca",
) -> CA:  # fmt: skip
    d = Path(ca_dir)
    cp = Path(cert_path) if cert_path else d / key_name.replace(".key", ".crt")
    try:
        cert = x509.load_pem_x509_certificate(cp.read_bytes())
        key = serialization.load_pem_private_key((d / key_name).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PKIError(f"CA not set up: {exc.filename} missing (run {setup_verb})") from None
    except ValueError as exc:
        raise PKIError(f"CA material unreadable: {exc}") from None
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return CA(cert, key, cp)


def leaf(
    ca: CA, public_key: object, cn: str, days: int, serial: int | None = None,
    usages: tuple[x509.ObjectIdentifier, ...] = (
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
    names: Sequence[str] = (),
) -> x509.Certificate:  # fmt: skip
    if _sign_guard is not None:
        _sign_guard(f"certificate for CN={cn}")
    now = _now()
    builder = x509.CertificateBuilder()
    if names:
        from dispatcher.pki.names import san_entries

        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address(v)) if kind == "ip" else x509.DNSName(v)
            for kind, v in san_entries(names)
        ]), critical=False)  # fmt: skip
    return (
        builder.subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(serial or new_serial())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(list(usages)),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca.cert.public_key()  # type: ignore[arg-type]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )


def issue_dispatcher_cert(
    ca: CA, cert_path: str | Path, key_path: str | Path, days: int = 825,
    writer: StateWriter | None = None, names: Sequence[str] = (),
) -> x509.Certificate:  # fmt: skip
    """A new EC P-256 key and cert, written atomically (key 0600, cert 0644) through
    ``writer`` (default local writes); ``names`` go into its subjectAltName
    (:func:`dispatcher.pki.names.cert_names`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = leaf(ca, key.public_key(), DISPATCHER_CN, days, names=names)
    w = writer or LocalWriter()
    w.write(key_path, key_bytes(key), 0o600)
    w.write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert


def validate_csr(csr_pem: str, expected_cn: str | None = None) -> x509.CertificateSigningRequest:
    """Upstream's CSR checks (spec 4.4); raises PKIError naming the first failure."""
    if len(csr_pem.encode()) > MAX_CSR_PEM:
        raise PKIError(f"CSR too large (over {MAX_CSR_PEM} bytes)")
    if not csr_pem.lstrip().startswith("-----BEGIN CERTIFICATE REQUEST-----"):
        raise PKIError("CSR is not a PEM certificate request")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError:
        raise PKIError("CSR cannot be parsed") from None
    if not csr.is_signature_valid:
        raise PKIError("CSR self-signature does not verify")
    pub = csr.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < 2048:
            raise PKIError(f"CSR key too small ({pub.key_size} bits; need at least 2048)")
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.name not in ("secp256r1", "secp384r1"):
            raise PKIError(f"CSR uses an unsupported curve ({pub.curve.name})")
    else:
        raise PKIError("CSR key type not supported (RSA or EC P-256/P-384 only)")
    algo = csr.signature_hash_algorithm
    if algo is None or algo.name.lower() in WEAK_HASHES:
        raise PKIError("CSR signed with a weak digest")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise PKIError("CSR has no common name")
    cn = cns[0].value
    cn_text = cn.decode() if isinstance(cn, bytes) else cn
    if expected_cn is not None and cn_text != expected_cn:
        raise PKIError(f"CSR common name '{cn_text}' does not match '{expected_cn}'")
    return csr


def csr_common_name(csr: x509.CertificateSigningRequest) -> str:
    """The (first) CN of a CSR :func:`validate_csr` accepted."""
    cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return cn.decode() if isinstance(cn, bytes) else cn


def public_key_sha256(public_key: object) -> str:
    """Hex SHA-256 of a public key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def sign_csr(ca: CA, csr_pem: str, days: int = 825, expected_cn: str | None = None) -> str:
    csr = validate_csr(csr_pem, expected_cn)
    cn = str(csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    cert = leaf(ca, csr.public_key(), cn, days)
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def cert_serial_hex(path: str | Path) -> str:
    """Lower-case hex serial of the certificate at ``path``."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    return format(cert.serial_number, "x")


def cert_not_after(pem: str | bytes) -> str:
    data = pem.encode() if isinstance(pem, str) else pem
    return openssl_date(x509.load_pem_x509_certificate(data).not_valid_after_utc)
