"""Certificate serial canonicalisation, bit-compatible with upstream ``serial_to_hex``.

Upstream (spec 2.6) reads an all-digit string as a *decimal* number. We reproduce that
exactly, because agents and dispatchers of both implementations compare canonical forms.
New serials we issue always contain a hex letter, so they never fall into that trap.
"""

from __future__ import annotations

import re

_HEX = re.compile(r"^[0-9a-f]+$")
_DEC = re.compile(r"^[0-9]+$")


def serial_to_hex(value: str | int | None) -> str:
    """Return the canonical lower-case hex form of a serial, or "" if it is not one."""
    if value is None:
        return ""
    if isinstance(value, int):
        return format(value, "x")
    s = value.strip()
    if s.lower().startswith("serial="):
        s = s[len("serial=") :]
    if s.lower().startswith("0x"):
        s = s[2:]
    if not s:
        return ""
    if ":" in s:
        s = s.replace(":", "").lower()
        if not _HEX.match(s):
            return ""
        return s.lstrip("0") or "0"
    s = s.lower()
    if _DEC.match(s):
        return format(int(s, 10), "x")
    if _HEX.match(s):
        return s.lstrip("0") or "0"
    return ""


def new_serial() -> int:
    """A random positive 120-bit serial whose minimal hex form contains a letter a-f."""
    import secrets  # not on ced's path (~3 ms)

    while True:
        n = secrets.randbits(120) | (1 << 119)
        if not _DEC.match(format(n, "x")):
            return n
