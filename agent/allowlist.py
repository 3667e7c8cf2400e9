"""The script allowlist ``scripts.conf``: ``name = /abs/path [profile=x]`` (spec 2.4).

Bad lines are skipped with a warning naming ``file:line`` (as upstream); an unreadable
file is a :class:`ConfigError`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from agent.common.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_LINE = re.compile(r"^([^=\s]+)\s*=\s*(.*?)\s*$")
_ANNOTATION = re.compile(r"^[a-z_]+=")


@dataclass(frozen=True)
class Script:
    name: str
    path: str
    profile: str = "default"


def within_dirs(path: str, script_dirs: list[str]) -> bool:
    """True when ``path`` resolves (symlinks and ``..`` followed) inside a script dir."""
    if not script_dirs:
        return True
    real = os.path.realpath(path)
    for d in script_dirs:
        root = os.path.realpath(d)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return True
    return False


def parse(
    text: str, path: str, script_dirs: list[str] | None = None
) -> tuple[dict[str, Script], list[str]]:
    scripts: dict[str, Script] = {}
    warnings: list[str] = []
    dirs = script_dirs or []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{n}"
        m = _LINE.match(line)
        if not m or not NAME_RE.match(m.group(1)):
            warnings.append(f"{where}: malformed allowlist line skipped: {line!r}")
            continue
        name, rest = m.group(1), m.group(2)
        profile = "default"
        bare: list[str] = []
        for tok in rest.split():
            if _ANNOTATION.match(tok):
                k, _, v = tok.partition("=")
                if k == "profile" and v:
                    profile = v
            else:
                bare.append(tok)
        if len(bare) != 1:
            why = "no path" if not bare else "more than one path"
            warnings.append(f"{where}: script '{name}' skipped: {why}")
            continue
        spath = bare[0]
        if not spath.startswith("/"):
            warnings.append(f"{where}: script '{name}' skipped: path is not absolute")
            continue
        if not within_dirs(spath, dirs):
            warnings.append(f"{where}: script '{name}' skipped: outside script_dirs")
            continue
        if name in scripts:
            warnings.append(f"{where}: script '{name}' defined again; this line wins")
        scripts[name] = Script(name, spath, profile)
    return scripts, warnings


def load(
    path: str | Path, script_dirs: list[str] | None = None
) -> tuple[dict[str, Script], list[str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("allowlist not found", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read allowlist: {exc}", str(path)) from None
    return parse(text, str(path), script_dirs)
