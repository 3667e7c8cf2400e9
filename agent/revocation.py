"""The revocation list: one serial per line, ``#`` comments (spec 2.5).

Unlike the trust map, a malformed line makes the whole file invalid: silently skipping a
line of a revocation list could un-revoke a certificate. The caller keeps the last good
list (reload) or refuses to start.
"""

from __future__ import annotations

from pathlib import Path

from agent.common.errors import ConfigError
from agent.common.serial import serial_to_hex


def parse(text: str, path: str) -> frozenset[str]:
    out: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        canon = serial_to_hex(line)
        if not canon:
            raise ConfigError(f"not a certificate serial: {line!r}", path, n)
        out.add(canon)
    return frozenset(out)


def load(path: str | Path) -> frozenset[str] | None:
    """The revoked serials, or None when the file does not exist."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read revocation list: {exc}", str(path)) from None
    return parse(text, str(path))
