"""``ssh`` and ``scp`` between lab hosts (:mod:`ops.lab.hosts`), for guides and runbooks.

In production the deployment guide copies files with ``scp HOST:PATH ...`` and runs a
command elsewhere with ``ssh HOST CMD``; on a lab host those names are these shims
(``ops/lab/bin/ssh``, ``ops/lab/bin/scp``), which reach the other host through its
namespaces instead of a network login:

* ``ssh [-o ...] [USER@]HOST CMD...``: runs ``CMD`` (a shell command line) on ``HOST``;
* ``scp [-r] [-p] [-q] SRC... DEST``: each of ``SRC``/``DEST`` is ``[USER@]HOST:PATH`` or a
  local path; a path under one of the host's own directories is that host's file, any
  other path is the shared machine's.

Hosts are found in ``$LAB_FILE`` (written by :class:`ops.lab.hosts.Lab`) by name or FQDN;
the current host is ``$LAB_HOST``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any


def _lab() -> dict[str, Any]:
    return dict(json.loads(Path(os.environ["LAB_FILE"]).read_text()))


def _host(lab: dict[str, Any], name: str) -> dict[str, Any]:
    name = name.split("@", 1)[-1]
    for h in lab["hosts"]:
        if name in (h["name"], h["fqdn"], h["address"]):
            return dict(h)
    raise SystemExit(f"ssh: Could not resolve hostname {name}: Name or service not known")


def real_path(lab: dict[str, Any], host: dict[str, Any], path: str, cwd: str = "/root") -> Path:
    """Where ``path`` of ``host`` (relative: to ``cwd``) is on the machine's file system."""
    if not path.startswith("/"):
        path = os.path.normpath(os.path.join(cwd, path))
    for own in lab["own_paths"]:
        if path == own or path.startswith(own.rstrip("/") + "/"):
            return Path(host["root"]) / path.lstrip("/")
    return Path(path)


def _split(lab: dict[str, Any], spec: str) -> Path:
    if ":" in spec and not spec.startswith("/"):
        host, _, path = spec.partition(":")
        return real_path(lab, _host(lab, host), path)
    here = os.environ.get("LAB_HOST", "")
    if not here:
        return Path(spec)
    return real_path(lab, _host(lab, here), spec, cwd=os.getcwd())


def scp(args: list[str]) -> int:
    lab = _lab()
    recursive = preserve = False
    paths: list[str] = []
    it = iter(args)
    for a in it:
        if a in ("-o", "-i", "-P"):
            next(it, None)
        elif a.startswith("-"):
            recursive |= "r" in a
            preserve |= "p" in a
        else:
            paths.append(a)
    if len(paths) < 2:
        print("usage: scp [-r] [-p] SRC... DEST", file=sys.stderr)
        return 1
    *sources, dest_spec = paths
    dest = _split(lab, dest_spec)
    for spec in sources:
        src = _split(lab, spec)
        contents = spec.endswith("/.")  # dir/. : what is in dir, as scp does
        target = dest if contents or not dest.is_dir() else dest / src.name
        if src.is_dir():
            if not recursive:
                print(f"scp: {spec}: not a regular file", file=sys.stderr)
                return 1
            shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True,
                            copy_function=shutil.copy2 if preserve else shutil.copy)  # fmt: skip
        elif src.exists():
            (shutil.copy2 if preserve else shutil.copy)(src, target)
        else:
            print(f"scp: {spec}: No such file or directory", file=sys.stderr)
            return 1
    return 0


def ssh(args: list[str]) -> int:
    lab = _lab()
    it = iter(args)
    rest: list[str] = []
    for a in it:
        if a in ("-o", "-i", "-p", "-l"):
            next(it, None)
        elif a.startswith("-") and not rest:
            continue
        else:
            rest.append(a)
    if not rest:
        print("usage: ssh HOST [CMD...]", file=sys.stderr)
        return 255
    host = _host(lab, rest[0])
    cmd = " ".join(rest[1:]) or "true"
    env = {**os.environ, "LAB_HOST": host["name"]}
    return subprocess.run(
        ["nsenter", "-t", str(host["pid"]), "-n", "-m", "-u", "--", "bash", "-c", cmd], env=env
    ).returncode


def main() -> int:
    prog = Path(sys.argv[0]).name
    args = sys.argv[1:]
    if args[:1] in (["ssh"], ["scp"]):
        prog, args = args[0], args[1:]
    return scp(args) if prog == "scp" else ssh(args)


if __name__ == "__main__":
    sys.exit(main())
