from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.common.serial import new_serial, serial_to_hex


def test_upstream_forms() -> None:
    assert serial_to_hex("DE:AD:BE:EF") == "deadbeef"
    assert serial_to_hex("0xABC") == "abc"
    assert serial_to_hex("serial=00ABC") == "abc"
    assert serial_to_hex("00:0a") == "a"
    assert serial_to_hex("000f") == "f"


def test_all_digits_is_decimal_like_upstream() -> None:
    # The upstream interop hazard, reproduced on purpose (spec 2.6).
    assert serial_to_hex("16") == "10"
    assert serial_to_hex("02") == "2"
    assert serial_to_hex("0123") == "7b"


def test_garbage_is_empty() -> None:
    for bad in ("", "xyz", "0x", "12:zz", "serial=", "  "):
        assert serial_to_hex(bad) == ""
    assert serial_to_hex(None) == ""


def test_int_input() -> None:
    assert serial_to_hex(255) == "ff"


@given(st.integers(min_value=256, max_value=2**160))
def test_colon_form_roundtrip(n: int) -> None:
    h = format(n, "x")
    if len(h) % 2:
        h = "0" + h
    colon = ":".join(h[i : i + 2] for i in range(0, len(h), 2)).upper()
    assert serial_to_hex(colon) == format(n, "x")


def test_new_serial_has_hex_letter_and_entropy() -> None:
    seen = set()
    for _ in range(200):
        s = new_serial()
        h = format(s, "x")
        assert any(c in "abcdef" for c in h)
        assert s.bit_length() >= 64
        # canonicalisation must be stable for our serials
        assert serial_to_hex(h) == h
        seen.add(s)
    assert len(seen) == 200
