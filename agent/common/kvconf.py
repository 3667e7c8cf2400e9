"""Strict parsers for upstream's three ``key = value`` dialects; errors name ``file:line``.

* ``ctrl-exec.conf`` (flat): a line starting with optional whitespace then ``#``, or with
  whitespace at all, is ignored (upstream ignores indented lines); keys are ``\\w+``.
* ``agent.conf`` (INI-like): whole-line ``#`` comments only (an inline ``#`` is part of
  the value), ``[tags]`` and ``[profile NAME]`` sections; any other line that is not
  ``key = value`` or a section header is an error.
* ``scripts.conf``: see :mod:`agent.allowlist`.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.common.errors import ConfigError
from agent.common.records import record

_KV = re.compile(r"^(\w+)\s*=\s*(.*?)\s*$")
_SECTION = re.compile(r"^\[\s*([A-Za-z]+)(?:\s+([\w.-]+))?\s*\]$")


@record(frozen=True)
class Entry:
    line: int
    section: str  # "" for the top level, "tags", "profile NAME", or another name
    key: str
    value: str


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", str(path)) from None


def parse_flat(text: str, path: str) -> dict[str, tuple[int, str]]:
    """Parse the dispatcher dialect into ``{key: (line, value)}``; the last one wins."""
    out: dict[str, tuple[int, str]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw[0].isspace() or raw.lstrip().startswith("#"):
            continue
        m = _KV.match(raw)
        if not m:
            raise ConfigError(f"malformed config line: {raw.strip()!r}", path, n)
        out[m.group(1)] = (n, m.group(2))
    return out


def parse_ini(text: str, path: str, sections: list[str] | None = None) -> list[Entry]:
    """Parse the agent dialect into entries, in file order; every section header seen is
    appended to ``sections`` when given (a ``[profile NAME]`` may have no keys)."""
    section = ""
    out: list[Entry] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        sm = _SECTION.match(line)
        if sm:
            kind, name = sm.group(1).lower(), sm.group(2)
            if kind == "profile":
                if not name:
                    raise ConfigError("profile section needs a name", path, n)
                section = f"profile {name}"
            elif name:
                raise ConfigError(f"malformed section header: {line!r}", path, n)
            else:
                section = kind
            if sections is not None:
                sections.append(section)
            continue
        m = _KV.match(line)
        if not m:
            raise ConfigError(f"Malformed config line: {line!r}", path, n)
        out.append(Entry(n, section, m.group(1), m.group(2)))
    return out


def is_true(value: str | None) -> bool:
    """Upstream's boolean: ``1`` or anything starting with ``y``; we also take true/on."""
    if value is None:
        return False
    v = value.strip().lower()
    return v in {"1", "true", "on"} or v.startswith("y")
