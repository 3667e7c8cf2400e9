"""Agent-side checks of a pinned CA and of the approval (agent/pairing.py)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import pairing
from agent.common import certs


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey, pub: object,
          not_before: dt.datetime) -> x509.Certificate:  # fmt: skip
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(pub).serial_number(7).not_valid_before(not_before)  # type: ignore[arg-type]
            .not_valid_after(not_before + dt.timedelta(days=30)).sign(key, hashes.SHA256()))  # fmt: skip


def _pem(c: x509.Certificate) -> str:
    return c.public_bytes(serialization.Encoding.PEM).decode()


def test_fingerprint_format_and_parsing() -> None:
    der = b"not really a certificate"
    fp = certs.fingerprint(der)
    assert fp.startswith("SHA256:") and len(fp) == 7 + 64 and fp[7:].islower()
    colons = ":".join(fp[7 + i : 9 + i] for i in range(0, 64, 2)).upper()
    for text in (fp, fp.upper(), fp[7:], "sha256:" + colons, f"  {fp}  "):
        assert certs.parse_fingerprint(text) == fp
    for bad in ("", "SHA256:", "SHA1:" + fp[7:], fp[:-1], fp + "0", fp[:-1] + "g"):
        with pytest.raises(ValueError):
            certs.parse_fingerprint(bad)


def test_approval_from_a_dispatcher_whose_clock_runs_ahead_is_accepted() -> None:
    """Upstream certificates start at "now" on the dispatcher: a slower agent clock is fine."""
    ca_key, agent_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=2)
    ca = _cert("ctrl-exec CA", "ctrl-exec CA", ca_key, ca_key.public_key(), later)
    cert = _cert("agent.test", "ctrl-exec CA", ca_key, agent_key.public_key(), later)
    req = pairing.PairingRequest("agent.test", "", certs.key_pem(agent_key), "n", "000000")
    result = {"cert": _pem(cert), "ca": _pem(ca)}
    assert pairing.check_approval(result, req, None) == certs.fingerprint(ca)
    assert pairing.check_approval(result, req, certs.fingerprint(ca)) == certs.fingerprint(ca)
    with pytest.raises(pairing.PairingError, match="does not match --ca-fingerprint"):
        pairing.check_approval(result, req, certs.fingerprint(b"x"))
    pairing.check_pinned_chain([cert.public_bytes(serialization.Encoding.DER),
                                ca.public_bytes(serialization.Encoding.DER)],
                               certs.fingerprint(ca))  # fmt: skip
    other = ec.generate_private_key(ec.SECP256R1())
    forged = _cert("agent.test", "ctrl-exec CA", other, agent_key.public_key(), later)
    with pytest.raises(pairing.PairingError, match="not issued by the dispatcher CA"):
        pairing.check_approval({"cert": _pem(forged), "ca": _pem(ca)}, req, None)
    with pytest.raises(pairing.PairingError, match="not issued by the dispatcher CA"):
        pairing.check_pinned_chain([forged.public_bytes(serialization.Encoding.DER),
                                    ca.public_bytes(serialization.Encoding.DER)],
                                   certs.fingerprint(ca))  # fmt: skip
