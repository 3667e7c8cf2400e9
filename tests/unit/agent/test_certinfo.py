from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import certinfo
from agent.common.datefmt import openssl_date, parse_openssl_date
from ops.lab.pki import TestCA


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


def _strptime(text: str) -> dt.datetime:
    return dt.datetime.strptime(" ".join(text.split()), "%b %d %H:%M:%S %Y GMT").replace(
        tzinfo=dt.UTC
    )


@pytest.mark.parametrize("text", [
    "Jun  7 16:28:00 2027 GMT", "jun 07 6:8:0 2027 gmt", " Dec 31 23:59:59 9999 GMT ",
    "Feb 29 00:00:00 2028 GMT", "Feb 29 00:00:00 2027 GMT", "Jun 31 00:00:00 2027 GMT",
    "Jun 7 24:00:00 2027 GMT", "Jun 7 16:60:00 2027 GMT", "Jun 7 16:28:60 2027 GMT",
    "Jun 0 16:28:00 2027 GMT", "June 7 16:28:00 2027 GMT", "Jun 7 16:28:00 27 GMT",
    "Jun 7 16:28:00 2027 UTC", "Jun 7 16:28:00 2027", "", "Jun 7 16:28 2027 GMT",
    "Jun 123 16:28:00 2027 GMT", "Jun 7 16:28:00 2027 GMT x",
])  # fmt: skip
def test_parse_openssl_date_accepts_what_strptime_accepts(text: str) -> None:
    try:
        expected: dt.datetime | None = _strptime(text)
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(ValueError):
            parse_openssl_date(text)
    else:
        assert parse_openssl_date(text) == expected


@given(st.datetimes(min_value=dt.datetime(1000, 1, 1), max_value=dt.datetime(9999, 12, 31)))
def test_parse_openssl_date_round_trip(when: dt.datetime) -> None:
    when = when.replace(microsecond=0, tzinfo=dt.UTC)
    text = openssl_date(when)
    assert parse_openssl_date(text) == when == _strptime(text)
