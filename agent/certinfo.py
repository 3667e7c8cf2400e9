"""Read a certificate's notAfter, serial and key hash with the standard library only.

The serve loop needs the expiry for ``/ping`` but must not load ``cryptography`` (about
8 MB of RSS) for it; a certificate's validity is a fixed place in its DER encoding.
``ced run`` with an auth hook needs the dispatcher's serial (:func:`serial_hex`) and must
not pay ``cryptography``'s import (~55 ms) for it either.
"""

from __future__ import annotations

import binascii
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datetime as dt

_BEGIN, _END = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """Return (tag, start of value, end of value) of the DER element at ``pos``."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    return tag, pos, pos + length


def _time(tag: int, raw: bytes) -> dt.datetime:
    import datetime as dt  # not on ced's path (~3 ms)

    text = raw.decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    if len(text) == 15 and text[14] == "Z" and text[:14].isascii() and text[:14].isdigit():
        try:  # the fixed-width form every certificate has, without _strptime (~0.4 MB RSS)
            return dt.datetime(int(text[0:4]), int(text[4:6]), int(text[6:8]), int(text[8:10]),
                               int(text[10:12]), int(text[12:14]), tzinfo=dt.UTC)  # fmt: skip
        except ValueError:
            pass  # strptime decides
    return dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)


def not_after_der(der: bytes) -> dt.datetime:
    _, cert_start, _ = _tlv(der, 0)  # Certificate
    _, tbs, _ = _tlv(der, cert_start)  # TBSCertificate
    pos = tbs
    tag, _, end = _tlv(der, pos)
    if tag == 0xA0:  # explicit version
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, pos = _tlv(der, pos)
    _, vstart, _ = _tlv(der, pos)  # validity
    _, _, nb_end = _tlv(der, vstart)
    tag, start, end = _tlv(der, nb_end)
    return _time(tag, der[start:end])


def not_after(path: str | Path) -> dt.datetime:
    pem = Path(path).read_text()
    return not_after_der(ssl.PEM_cert_to_DER_cert(pem))


def identity_der(der: bytes) -> tuple[str, str]:
    """``(serial, pubkey_sha256)`` of a DER certificate: the lower-case hex serial
    (``agent.common.serial.serial_to_hex`` form) and the hex SHA-256 of its DER
    SubjectPublicKeyInfo (what ``cryptography`` gives for ``public_bytes(DER, SPKI)``).

    ValueError when the DER is not a certificate this walker understands.
    """
    import hashlib

    try:
        _, cert_start, _ = _tlv(der, 0)  # Certificate
        _, pos, _ = _tlv(der, cert_start)  # TBSCertificate
        tag, _, end = _tlv(der, pos)
        if tag == 0xA0:  # explicit version
            pos = end
        tag, start, pos = _tlv(der, pos)  # serialNumber
        if tag != 0x02:
            raise ValueError("no serial number")
        serial = int.from_bytes(der[start:pos], "big", signed=True)
        for _ in range(4):  # signature, issuer, validity, subject
            _, _, pos = _tlv(der, pos)
        tag, _, end = _tlv(der, pos)  # subjectPublicKeyInfo, hashed whole
        if tag != 0x30 or end > len(der):
            raise ValueError("no public key")
    except IndexError:
        raise ValueError("truncated certificate") from None
    return format(serial, "x"), hashlib.sha256(der[pos:end]).hexdigest()


def first_pem_der(pem: bytes) -> bytes:
    """The DER of the first certificate in ``pem`` (a chain is fine); ValueError if none."""
    start = pem.find(_BEGIN)
    end = pem.find(_END, start + 1)
    if start < 0 or end < 0:
        raise ValueError("no PEM certificate")
    try:
        return binascii.a2b_base64(
            b"".join(pem[start + len(_BEGIN) : end].split()), strict_mode=True
        )
    except binascii.Error as exc:
        raise ValueError(f"bad PEM base64: {exc}") from None


def serial_hex(path: str | Path) -> str:
    """Lower-case hex serial of the (first) certificate in the PEM file ``path``, as
    ``format(cert.serial_number, "x")``; OSError or ValueError when unreadable."""
    return identity_der(first_pem_der(Path(path).read_bytes()))[0]
