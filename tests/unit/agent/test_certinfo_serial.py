"""certinfo's stdlib DER walk reads the serial ``cryptography`` reads, and refuses garbage."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.certinfo import first_pem_der, identity_der, serial_hex


def _cert(serial: int, rsa_key: bool = False) -> bytes:
    key = (
        rsa.generate_private_key(65537, 2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t" * 60)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(serial).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    "serial", [1, 0x7F, 0x80, 0xFF, 0x1234, (1 << 119) | 0xABC, (1 << 159) - 1]
)
def test_serial_matches_cryptography(tmp_path: Path, serial: int) -> None:
    pem = _cert(serial, rsa_key=serial == 0x80)
    path = tmp_path / "c.pem"
    path.write_bytes(b"junk before\n" + pem + _cert(99))  # the first one counts
    want = format(x509.load_pem_x509_certificate(pem).serial_number, "x")
    assert serial_hex(path) == want == format(serial, "x")


@pytest.mark.parametrize(
    "pem",
    [b"", b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
     b"-----BEGIN CERTIFICATE-----\nMAM=\n-----END CERTIFICATE-----\n",  # 30 03: truncated
     b"-----BEGIN CERTIFICATE-----\nAgEB\n-----END CERTIFICATE-----\n"],  # INTEGER, no SEQUENCE
)  # fmt: skip
def test_garbage_is_a_value_error(tmp_path: Path, pem: bytes) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(pem)
    with pytest.raises(ValueError):
        serial_hex(path)


def test_truncated_der_is_refused() -> None:
    der = first_pem_der(_cert(0x1234))
    for cut in (1, 2, 5, 9, 12, 20, 200):
        with pytest.raises(ValueError):
            identity_der(der[:cut])
