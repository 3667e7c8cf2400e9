from __future__ import annotations

import datetime as dt
from pathlib import Path

from agent import certinfo
from agent.datefmt import openssl_date, parse_openssl_date
from tests.support.pki import TestCA


def test_not_after_matches_cryptography(tmp_path: Path) -> None:
    from cryptography import x509

    ca = TestCA(tmp_path)
    for days in (1, 400, 20000):  # 20000 days crosses 2050: GeneralizedTime
        issued = ca.issue(f"c{days}", days=days)
        expected = x509.load_pem_x509_certificate(issued.cert.read_bytes()).not_valid_after_utc
        assert certinfo.not_after(issued.cert) == expected
    issued = ca.issue("rsa", rsa_bits=2048)
    expected = x509.load_pem_x509_certificate(issued.cert.read_bytes()).not_valid_after_utc
    assert certinfo.not_after(issued.cert) == expected


def test_openssl_date_format() -> None:
    when = dt.datetime(2027, 6, 7, 16, 28, 0, tzinfo=dt.UTC)
    assert openssl_date(when) == "Jun  7 16:28:00 2027 GMT"
    assert parse_openssl_date("Feb 25 14:06:30 2029 GMT") == dt.datetime(
        2029, 2, 25, 14, 6, 30, tzinfo=dt.UTC
    )
