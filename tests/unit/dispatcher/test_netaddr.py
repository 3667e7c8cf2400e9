"""dispatcher.netaddr.plain_ip: what the API proxy listener and the pairing server did."""

from __future__ import annotations

import pytest

from dispatcher.netaddr import plain_ip


@pytest.mark.parametrize("keep_zone", [False, True])
@pytest.mark.parametrize(
    ("given", "plain"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::1", "::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),  # canonical form
        ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped IPv6 as IPv4
        ("::FFFF:192.0.2.7", "192.0.2.7"),
        ("::ffff:c000:207", "192.0.2.7"),
        ("::ffff:192.0.2.7%eth0", "192.0.2.7"),  # a mapped address has no zone
        ("[::1]", "::1"),  # brackets of an IPv6 literal
        ("[::ffff:192.0.2.7]", "192.0.2.7"),
        ("", ""),  # not an address: unchanged
        ("localhost", "localhost"),
        ("192.0.2.300", "192.0.2.300"),
        ("[192.0.2.7]", "[192.0.2.7]"),  # IPv4 is never bracketed
        ("[not-an-ip]", "[not-an-ip]"),
        ("no%such", "no%such"),
    ],
)
def test_plain_ip(given: str, plain: str, keep_zone: bool) -> None:
    assert plain_ip(given, keep_zone=keep_zone) == plain


def test_zone_dropped_unless_kept() -> None:
    # the API proxy listener compares with networks: no zone
    assert plain_ip("fe80::1%eth0") == "fe80::1"
    assert plain_ip("[fe80::1%eth0]") == "fe80::1"
    # the pairing server keeps it: a link-local source stays reachable
    assert plain_ip("fe80::1%eth0", keep_zone=True) == "fe80::1%eth0"
    assert plain_ip("FE80::0:1%2", keep_zone=True) == "fe80::1%2"
    assert plain_ip("fe80::1%", keep_zone=True) == "fe80::1"
