"""The agent's CA file as a bundle: what ``POST /ca-bundle`` may change (CA rotation).

During a CA rotation the agent trusts the old and the new CA (a bundle in its ``ca``
file); once every certificate in use is issued by the new one the old one is dropped.
Both changes are checked here, before anything is written:

* ``add``: every certificate of the request must be a CA certificate (basicConstraints
  ``CA:TRUE``), self-signed, within its validity; at most :data:`MAX_CAS` CAs in all.
  The result is the union with what the file holds: ``add`` never removes a CA.
* ``drop``: removes the CA with a given SHA-256 fingerprint, refused when it would leave
  no CA, when it issued the agent's own certificate (renew first), or when it issued the
  certificate of the dispatcher asking (it would lock its caller out).

The file is replaced atomically (same mode); ``cryptography`` is imported only here.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.common.certs import fingerprint, parse_fingerprint
from agent.common.fsutil import atomic_write

MAX_CAS = 4
MAX_BYTES = 16 * 1024  # four RSA-4096 CA certificates take about 8 KiB


class BundleError(ValueError):
    """The change is refused; the message is for the wire."""


def load(path: str | Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # InvalidSignature, ValueError, TypeError
        return False
    return True


def _check_ca(cert: x509.Certificate, now: dt.datetime) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise BundleError("a bundle certificate is not a CA (no basicConstraints)") from None
    if not bc.ca:
        raise BundleError("a bundle certificate is not a CA (CA:FALSE)")
    if not _issued_by(cert, cert):
        raise BundleError("a bundle certificate is not a self-signed CA")
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise BundleError("a bundle CA is not within its validity period")


def render(cas: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cas)


def merged(
    current: list[x509.Certificate], pem: str, now: dt.datetime | None = None
) -> list[x509.Certificate]:
    """``current`` plus the CAs of ``pem`` (checked), without duplicates."""
    now = now or dt.datetime.now(dt.UTC)
    if not pem.strip():
        raise BundleError("bundle required (PEM CA certificates)")
    if len(pem) > MAX_BYTES:
        raise BundleError(f"bundle larger than {MAX_BYTES} bytes")
    try:
        new = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise BundleError("bundle is not PEM certificates") from None
    if len(new) > MAX_CAS:
        raise BundleError(f"a bundle of more than {MAX_CAS} CAs is refused")
    for cert in new:
        _check_ca(cert, now)
    have = {fingerprint(c) for c in current}
    out = list(current)
    for cert in new:
        if fingerprint(cert) not in have:
            have.add(fingerprint(cert))
            out.append(cert)
    if len(out) > MAX_CAS:
        raise BundleError(f"a bundle of more than {MAX_CAS} CAs is refused")
    return out


def dropped(current: list[x509.Certificate], fp_text: str, own: x509.Certificate | None,
            caller: x509.Certificate | None) -> list[x509.Certificate]:  # fmt: skip
    """``current`` without the CA of fingerprint ``fp_text`` (checked, see the docstring)."""
    try:
        fp = parse_fingerprint(fp_text)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    victim = [c for c in current if fingerprint(c) == fp]
    if not victim:
        return list(current)  # absent: a no-op, like /rotate-serial remove
    rest = [c for c in current if fingerprint(c) != fp]
    if not rest:
        raise BundleError("refusing to drop the only CA")
    if own is not None and not any(_issued_by(own, c) for c in rest):
        raise BundleError("refusing to drop the CA of the agent's own certificate; renew first")
    if caller is None or not any(_issued_by(caller, c) for c in rest):
        raise BundleError("refusing to drop the CA of the calling dispatcher's certificate")
    return rest


def write(path: str | Path, cas: list[x509.Certificate]) -> None:
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    atomic_write(path, render(cas), mode)
