"""The trusted-dispatcher map: ``<hex-serial> <dispatcher-id>`` lines (spec 4.3)."""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.common.errors import ConfigError
from agent.common.fsutil import atomic_write
from agent.common.serial import serial_to_hex

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HEADER = (
    "# ctrl-exec trusted dispatchers: <serial> <id>, one per line.\n"
    "# Managed by pairing - do not edit by hand.\n"
)


def parse(text: str) -> tuple[dict[str, str], list[tuple[int, str]]]:
    """Return ``({serial: id}, [(line, warning)])``; malformed lines are skipped."""
    out: dict[str, str] = {}
    warnings: list[tuple[int, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            warnings.append((n, f"malformed entry {line!r}"))
            continue
        serial, ident = serial_to_hex(parts[0]), parts[1].strip()
        if not serial:
            warnings.append((n, f"bad serial {parts[0]!r}"))
            continue
        if not ID_RE.match(ident):
            warnings.append((n, f"bad dispatcher id {ident!r}"))
            continue
        out[serial] = ident
    return out, warnings


def load(path: str | Path) -> tuple[dict[str, str], list[tuple[int, str]]]:
    """Load the map; a missing file is an empty map. Unreadable raises ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read trusted-dispatcher map: {exc}", str(path)) from None
    return parse(text)


def render(entries: dict[str, str]) -> str:
    return HEADER + "".join(f"{s} {i}\n" for s, i in sorted(entries.items()))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add(path: str | Path, serial: str, ident: str) -> str:
    """Add or update ``serial -> ident``; returns the canonical serial written."""
    canon = serial_to_hex(serial)
    if not canon:
        raise ValueError(f"invalid serial {serial!r}")
    if not ID_RE.match(ident):
        raise ValueError(f"invalid dispatcher id {ident!r}")
    p = Path(path)
    with _locked(p):
        entries, _ = load(p)
        entries[canon] = ident
        atomic_write(p, render(entries), 0o644)
    return canon


def remove(path: str | Path, serial: str, ident: str) -> bool:
    """Remove ``serial`` if it belongs to ``ident``; absent is a no-op (False).

    Raises PermissionError when the serial is mapped to another dispatcher id.
    """
    canon = serial_to_hex(serial)
    if not canon:
        raise ValueError(f"invalid serial {serial!r}")
    p = Path(path)
    with _locked(p):
        entries, _ = load(p)
        owner = entries.get(canon)
        if owner is None:
            return False
        if owner != ident:
            raise PermissionError(f"serial not owned by '{ident}'")
        del entries[canon]
        atomic_write(p, render(entries), 0o644)
    return True
