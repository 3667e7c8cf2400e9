"""``systemctl`` for lab hosts (:mod:`ops.lab.hosts`), which have no systemd.

The deployment guide and the runbooks say ``systemctl enable --now ctrl-exec-api``; on a
lab host that command is this module (``ops/lab/bin/systemctl`` is first on the host's
``PATH``), so the guide's commands and the units' ``ExecStart``/``ExecReload`` lines run
for real. It implements the part of systemd that our units and Debian's ``etcd``,
``haproxy`` and ``keepalived`` units use:

* unit files from ``/etc/systemd/system`` then ``/lib/systemd/system``, with drop-ins
  (``NAME.service.d/*.conf``); ``%H``, ``%p``, ``%n``, ``%%`` specifiers;
* ``User=``/``Group=`` (``setpriv``), ``Environment=``, ``EnvironmentFile=`` (``-`` for
  optional), ``$VAR``/``${VAR}`` in command lines, ``ExecStartPre=`` (``+`` as root, ``-``
  failure ignored), ``ExecStart=``, ``ExecReload=`` (with ``$MAINPID``),
  ``StateDirectory=``/``RuntimeDirectory=``/``LogsDirectory=`` and their ``*Mode=``,
  ``KillSignal=``, ``TimeoutStopSec=``, ``Type=notify`` (waits for ``READY=1`` on a
  ``NOTIFY_SOCKET``, as systemd does, or :data:`QUIET_READY` s of the process running:
  keepalived notifies only a parent that is PID 1);
* verbs ``start``, ``stop``, ``restart``, ``reload``, ``enable [--now]``, ``disable``,
  ``is-active``, ``status``, ``show -p MainPID``, ``daemon-reload``; and ``journalctl -u
  NAME`` (``ops/lab/bin/journalctl``) prints the unit's output.

Not emulated: ``Restart=`` (nothing restarts a dead service: the tests that kill a process
restart it themselves), sandboxing directives (``systemd-analyze security`` checks those,
``tests/integration/test_systemd_units.py``), cgroups. Each process started runs in its own
session; the unit's state lives in ``/run/lab-systemd`` (the host's own ``/run``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

UNIT_DIRS = (Path("/etc/systemd/system"), Path("/lib/systemd/system"))
STATE = Path("/run/lab-systemd")
_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


class UnitError(Exception):
    pass


@dataclass
class Unit:
    name: str
    service: dict[str, list[str]] = field(default_factory=dict)
    unit: dict[str, list[str]] = field(default_factory=dict)

    def get(self, key: str, default: str = "") -> str:
        values = self.service.get(key)
        return values[-1] if values else default

    def all(self, key: str) -> list[str]:
        """Every value of ``key``; an empty assignment resets the list (systemd's rule)."""
        out: list[str] = []
        for v in self.service.get(key, []):
            if v == "":
                out.clear()
            else:
                out.append(v)
        return out

    @property
    def prefix(self) -> str:
        return self.name.rsplit(".", 1)[0].split("@", 1)[0]


def _parse_into(unit: Unit, text: str) -> None:
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            name = line.strip("[]")
            section = unit.service if name == "Service" else (
                unit.unit if name == "Unit" else {})  # fmt: skip
            continue
        if section is None or "=" not in line:
            continue
        key, value = line.split("=", 1)
        section.setdefault(key.strip(), []).append(value.strip())


def load(name: str) -> Unit:
    if "." not in name:
        name += ".service"
    unit = Unit(name)
    found = False
    for d in reversed(UNIT_DIRS):  # /lib first, /etc overrides
        f = d / name
        if f.is_file():
            unit.service.clear()
            unit.unit.clear()
            _parse_into(unit, f.read_text())
            found = True
    if not found:
        raise UnitError(f"Unit {name} not found.")
    for d in reversed(UNIT_DIRS):
        dropins = d / f"{name}.d"
        if dropins.is_dir():
            for f in sorted(dropins.glob("*.conf")):
                _parse_into(unit, f.read_text())
    return unit


def _specifiers(unit: Unit, s: str) -> str:
    table = {"H": socket.gethostname(), "p": unit.prefix, "n": unit.name, "%": "%"}
    return re.sub(r"%(.)", lambda m: table.get(m[1], m[0]), s)


def environment(unit: Unit) -> dict[str, str]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8"}  # fmt: skip
    for spec in unit.all("Environment"):
        for word in shlex.split(_specifiers(unit, spec)):
            k, _, v = word.partition("=")
            env[k] = v
    for spec in unit.all("EnvironmentFile"):
        optional = spec.startswith("-")
        path = Path(_specifiers(unit, spec.lstrip("-")))
        if not path.is_file():
            if optional:
                continue
            raise UnitError(f"{unit.name}: EnvironmentFile {path} not found")
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, _, v = line.partition("=")
                env[k.strip()] = " ".join(shlex.split(v)) if v.strip() else ""
    return env


def command(unit: Unit, spec: str, env: dict[str, str]) -> tuple[list[str], bool, bool]:
    """(argv, as_root, ignore_failure) of one ``Exec*=`` line."""
    as_root = ignore = False
    while spec and spec[0] in "+-@!:":
        as_root |= spec[0] in "+!"
        ignore |= spec[0] == "-"
        spec = spec[1:]
    argv: list[str] = []
    for word in shlex.split(_specifiers(unit, spec)):
        m = re.fullmatch(r"\$(\w+)", word)
        if m:  # "$VAR" alone: split into words (systemd's rule); "${VAR}": one word
            argv += env.get(m[1], "").split()
        else:
            argv.append(_VAR.sub(lambda m: env.get(m[1] or m[2], ""), word))
    return argv, as_root, ignore


def _as_user(unit: Unit, argv: list[str], as_root: bool) -> list[str]:
    user = unit.get("User")
    if as_root or not user or user == "root":
        return argv
    group = unit.get("Group") or user
    return ["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups", "--", *argv]


def _make_dirs(unit: Unit) -> None:
    user = unit.get("User") or "root"
    pw = pwd.getpwnam(user)
    group = unit.get("Group")
    gid = pw.pw_gid if not group else int(subprocess.check_output(["getent", "group", group],
                                                                   text=True).split(":")[2])  # fmt: skip
    for key, base in (("StateDirectory", "/var/lib"), ("RuntimeDirectory", "/run"),
                      ("LogsDirectory", "/var/log")):  # fmt: skip
        mode = int(unit.get(f"{key}Mode", "0755"), 8)
        for spec in unit.all(key):
            for name in spec.split():
                d = Path(base) / name
                d.mkdir(parents=True, exist_ok=True)
                os.chown(d, pw.pw_uid, gid)
                d.chmod(mode)


def _files(name: str) -> tuple[Path, Path]:
    STATE.mkdir(parents=True, exist_ok=True)
    return STATE / f"{name}.pid", STATE / f"{name}.log"


def main_pid(name: str) -> int:
    pidfile, _ = _files(name)
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return 0
    with contextlib.suppress(OSError):  # a zombie is not running
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return 0
    return pid


def _run(unit: Unit, spec: str, env: dict[str, str], log: Path) -> None:
    argv, as_root, ignore = command(unit, spec, env)
    with log.open("ab") as out:
        rc = subprocess.run(_as_user(unit, argv, as_root), env=env, stdout=out,
                            stderr=subprocess.STDOUT, timeout=120).returncode  # fmt: skip
    if rc != 0 and not ignore:
        raise UnitError(f"{unit.name}: {shlex.join(argv)} exited {rc} (journalctl -u {unit.name})")


def start(name: str) -> None:
    unit = load(name)
    if main_pid(unit.name):
        return
    pidfile, log = _files(unit.name)
    env = environment(unit)
    _make_dirs(unit)
    for spec in unit.all("ExecStartPre"):
        _run(unit, spec, env, log)
    specs = unit.all("ExecStart")
    if not specs:
        raise UnitError(f"{unit.name}: no ExecStart")
    argv, as_root, _ = command(unit, specs[0], env)
    notify = unit.get("Type") == "notify"
    sock_path = STATE / f"{unit.name}.notify"
    sock = None
    if notify:
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        os.chmod(sock_path, 0o777)
        env["NOTIFY_SOCKET"] = str(sock_path)
    with log.open("ab") as out:
        p = subprocess.Popen(_as_user(unit, argv, as_root), env=env, stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    pidfile.write_text(str(p.pid))
    if sock is not None:
        _wait_ready(unit, sock, p, float(unit.get("TimeoutStartSec", "90").rstrip("s")))
        sock.close()
    else:
        time.sleep(0.1)
        if p.poll() is not None:
            raise UnitError(f"{unit.name}: exited {p.returncode} at start "
                            f"(journalctl -u {unit.name})")  # fmt: skip


#: Some daemons (keepalived) notify only when their parent is PID 1: one that runs this long
#: without exiting or notifying counts as started (systemd would wait TimeoutStartSec).
QUIET_READY = 5.0


#: Units that must say READY=1 themselves (ours): no QUIET_READY shortcut for them.
STRICT_READY = ("ctrl-exec-",)


def _wait_ready(unit: Unit, sock: socket.socket, p: subprocess.Popen[bytes], limit: float) -> None:
    deadline = time.monotonic() + limit
    strict = unit.name.startswith(STRICT_READY)
    quiet = time.monotonic() + (limit if strict else QUIET_READY)
    while time.monotonic() < deadline:
        if time.monotonic() > quiet and p.poll() is None:
            return
        if p.poll() is not None:
            raise UnitError(f"{unit.name}: exited {p.returncode} before it was ready")
        sock.settimeout(0.2)
        try:
            msg = sock.recv(4096).decode(errors="replace")
        except TimeoutError:
            continue
        if "READY=1" in msg.split("\n"):
            return
    raise UnitError(f"{unit.name}: not ready after {limit} s")


def stop(name: str) -> None:
    unit = load(name)
    pid = main_pid(unit.name)
    if not pid:
        return
    sig = signal.Signals[unit.get("KillSignal", "SIGTERM")]
    limit = float(unit.get("TimeoutStopSec", "90").rstrip("s"))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + limit
    while main_pid(unit.name) and time.monotonic() < deadline:
        time.sleep(0.05)
    if main_pid(unit.name):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    _files(unit.name)[0].unlink(missing_ok=True)


def reload(name: str) -> None:
    unit = load(name)
    pid = main_pid(unit.name)
    if not pid:
        raise UnitError(f"{unit.name} is not active, cannot reload.")
    env = {**environment(unit), "MAINPID": str(pid)}
    for spec in unit.all("ExecReload"):
        _run(unit, spec, env, _files(unit.name)[1])


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if Path(sys.argv[0]).name == "journalctl" or (args[:1] == ["journalctl"]):
        args = args[1:] if args[:1] == ["journalctl"] else args
        names = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-u"]
        for n in names:
            log = _files(n if "." in n else f"{n}.service")[1]
            sys.stdout.write(log.read_text(errors="replace") if log.exists() else "")
        return 0
    flags = {a for a in args if a.startswith("-")}
    words = [a for a in args if not a.startswith("-")]
    if "-p" in args:  # show -p MainPID NAME
        words = [w for w in words if w != "MainPID"]
    if not words:
        print("usage: systemctl VERB [UNIT...]", file=sys.stderr)
        return 2
    verb, names = words[0], words[1:]
    try:
        if verb == "daemon-reload":
            return 0
        for n in names:
            if verb in ("start",) or (verb == "enable" and "--now" in flags):
                start(n)
            elif verb == "stop" or (verb == "disable" and "--now" in flags):
                stop(n)
            elif verb == "restart":
                stop(n)
                start(n)
            elif verb in ("reload", "try-reload-or-restart"):
                reload(n)
            elif verb in ("enable", "disable"):
                load(n)
            elif verb == "is-active":
                active = bool(main_pid(load(n).name))
                print("active" if active else "inactive")
                if not active:
                    return 3
            elif verb == "status":
                u = load(n)
                pid = main_pid(u.name)
                print(f"* {u.name} - {u.unit.get('Description', [''])[-1]}")
                print(f"     Active: {'active (running)' if pid else 'inactive (dead)'}")
                if pid:
                    print(f"   Main PID: {pid}")
                if not pid:
                    return 3
            elif verb == "show":
                print(f"MainPID={main_pid(load(n).name)}")
            else:
                print(f"systemctl (lab): unknown verb {verb}", file=sys.stderr)
                return 2
    except (UnitError, KeyError, OSError, subprocess.SubprocessError) as exc:
        print(f"systemctl (lab): {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
