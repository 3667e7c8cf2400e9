"""The serial number of a PEM certificate, read with the standard library only.

A minimal walk of the DER (X.690) encoding, enough for ``Certificate ::= SEQUENCE {
tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber INTEGER, ... } ...}``
(RFC 5280 section 4.1). It exists so that paths which only need the serial (the auth
hook context of ``ced run``) do not import ``cryptography`` (~55 ms). It parses no more
than those three headers and checks each one; anything else is a ValueError.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

_BEGIN = b"-----BEGIN CERTIFICATE-----"
_END = b"-----END CERTIFICATE-----"
_SEQUENCE, _INTEGER, _VERSION = 0x30, 0x02, 0xA0


def _header(der: bytes, pos: int, want: int) -> tuple[int, int]:
    """Check the tag at ``pos`` is ``want``; (start of its content, content length)."""
    if pos + 2 > len(der):
        raise ValueError("truncated DER")
    if der[pos] != want:
        raise ValueError(f"unexpected DER tag 0x{der[pos]:02x} (want 0x{want:02x})")
    first = der[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(der):
            raise ValueError("bad DER length")
        length = int.from_bytes(der[pos : pos + n], "big")
        pos += n
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return pos, length


def first_pem_der(pem: bytes) -> bytes:
    """The DER bytes of the first certificate in ``pem``; ValueError if there is none."""
    start = pem.find(_BEGIN)
    end = pem.find(_END, start + 1)
    if start < 0 or end < 0:
        raise ValueError("no PEM certificate")
    try:
        return base64.b64decode(b"".join(pem[start + len(_BEGIN) : end].split()), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad PEM base64: {exc}") from None


def der_serial(der: bytes) -> int:
    """The serialNumber of a DER certificate (a non-negative integer)."""
    pos, _ = _header(der, 0, _SEQUENCE)  # Certificate
    pos, _ = _header(der, pos, _SEQUENCE)  # TBSCertificate
    if pos < len(der) and der[pos] == _VERSION:
        inner, length = _header(der, pos, _VERSION)
        pos = inner + length
    pos, length = _header(der, pos, _INTEGER)
    if length == 0:
        raise ValueError("empty serial")
    return int.from_bytes(der[pos : pos + length], "big", signed=True)


def serial_hex(path: str | Path) -> str:
    """Lower-case hex serial of the (first) certificate in the PEM file ``path``, as
    ``format(cert.serial_number, "x")``; OSError or ValueError when unreadable."""
    return format(der_serial(first_pem_der(Path(path).read_bytes())), "x")
