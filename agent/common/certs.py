"""Agent-side certificate work: keys, CSRs, the pairing code, staged-cert checks.

``cryptography`` is imported here only, so the request path of the server does not pay
for it unless a renewal or a pairing happens.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from agent.common.datefmt import openssl_date, parse_openssl_date
from agent.common.fsutil import atomic_write

__all__ = ["openssl_date", "parse_openssl_date"]


def pairing_code(csr_pem: str | bytes) -> str:
    """Spec 5.5: first 4 bytes of SHA-256(CSR PEM) as big-endian uint32, mod 10^6."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    n = int.from_bytes(hashlib.sha256(data).digest()[:4], "big")
    return f"{n % 1_000_000:06d}"


FINGERPRINT_PREFIX = "SHA256:"


def fingerprint(cert: x509.Certificate | bytes) -> str:
    """``SHA256:<64 lower-case hex>`` of a certificate's DER encoding (what
    ``openssl x509 -noout -fingerprint -sha256`` prints, without the colons)."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def ca_fingerprint(path: str | Path) -> str:
    """The :func:`fingerprint` of the (first) certificate in the PEM file ``path``: what
    ``ced pairing-mode`` prints and ``request-pairing --ca-fingerprint`` takes."""
    return fingerprint(load_cert(path))


def parse_fingerprint(text: str) -> str:
    """``text`` as :func:`fingerprint` writes it; accepts any case, colons, and the
    prefix in any case or not at all. ValueError when it is not a SHA-256 fingerprint."""
    body = text.strip()
    if body[: len(FINGERPRINT_PREFIX)].upper() == FINGERPRINT_PREFIX:
        body = body[len(FINGERPRINT_PREFIX) :]
    hexdigits = body.replace(":", "").lower()
    if len(hexdigits) != 64 or any(c not in "0123456789abcdef" for c in hexdigits):
        raise ValueError(f"not a SHA-256 fingerprint (want {FINGERPRINT_PREFIX}<64 hex>): {text!r}")
    return FINGERPRINT_PREFIX + hexdigits


def load_cert(path: str | Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def cert_expiry(path: str | Path) -> str:
    """The certificate's notAfter in openssl format, or ``unknown``."""
    try:
        return openssl_date(load_cert(path).not_valid_after_utc)
    except (OSError, ValueError):
        return "unknown"


def new_key(key_type: str = "rsa-3072") -> CertificateIssuerPrivateKeyTypes:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    bits = int(key_type.split("-")[1])
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def load_key(path: str | Path) -> CertificateIssuerPrivateKeyTypes:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return key


def make_csr(key: CertificateIssuerPrivateKeyTypes, cn: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _pub(obj: x509.Certificate | CertificateIssuerPrivateKeyTypes) -> bytes:
    pub = obj.public_key()
    return pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def validate_for_key(
    cert_pem: bytes, ca_path: str | Path, key_path: str | Path
) -> x509.Certificate:
    """Check that ``cert_pem`` is issued by our CA, is in date and matches our key.

    Raises ValueError with a message fit for the wire.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ValueError("cert is not a PEM certificate") from None
    try:
        cas = x509.load_pem_x509_certificates(Path(ca_path).read_bytes())
    except (OSError, ValueError):
        raise ValueError("agent CA certificate not available") from None
    why = "no CA"
    for ca in cas:  # a bundle during a CA rotation: any of its CAs
        try:
            cert.verify_directly_issued_by(ca)
            break
        except (ValueError, TypeError, Exception) as exc:  # InvalidSignature: not ValueError
            why = exc.__class__.__name__
    else:
        raise ValueError(f"cert not issued by the agent CA: {why}") from None
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise ValueError("cert is not within its validity period")
    try:
        key = load_key(key_path)
    except (OSError, ValueError, AssertionError):
        raise ValueError("agent key not available") from None
    if _pub(cert) != _pub(key):
        raise ValueError("cert does not match the agent key")
    return cert


def stage(cert_pem: bytes, staging_path: str | Path) -> None:
    Path(staging_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(staging_path, cert_pem, 0o640)


def promote(staging_path: str, cert_path: str, ca_path: str, key_path: str) -> str:
    """Install a valid staged cert over ``cert_path``; an invalid one is deleted.

    Returns ``promoted``, ``absent`` or ``invalid: <why>``.
    """
    try:
        data = Path(staging_path).read_bytes()
    except FileNotFoundError:
        return "absent"
    try:
        validate_for_key(data, ca_path, key_path)
    except ValueError as exc:
        os.unlink(staging_path)
        return f"invalid: {exc}"
    try:
        st = os.stat(cert_path)
        mode = st.st_mode & 0o777
    except FileNotFoundError:
        st, mode = None, 0o640
    atomic_write(cert_path, data, mode)
    if st is not None:
        try:
            os.chown(cert_path, st.st_uid, st.st_gid)
        except PermissionError:
            pass
    os.unlink(staging_path)
    return "promoted"
