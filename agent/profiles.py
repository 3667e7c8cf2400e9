"""Per-script security profiles: the ``[profile NAME]`` sections of ``agent.conf``.

Keys (upstream's): ``run_as`` (a user name ``[A-Za-z_][A-Za-z0-9_-]*`` or a numeric uid up
to 0xFFFFFFFF; unset means root), ``caps`` (comma or space list of ``CAP_*`` names: the
bounding, inheritable and ambient sets of the script), ``writable`` (colon list of
absolute paths: when set, the rest of the filesystem is read-only and ``/tmp`` is a
private tmpfs) and ``no_new_privileges`` (default on). A script without ``profile=`` uses
``default``, which must be defined like any other (upstream 0.12.2).

Profiles take effect only through the executor (``executor_socket``); in direct mode
they are parsed, checked and inert. Errors name ``file:line``.
"""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass, field

from agent.common.errors import ConfigError

RUN_AS_RE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_-]*|[0-9]+)$")
CAP_RE = re.compile(r"^CAP_[A-Z0-9_]+$")
MAX_UID = 0xFFFFFFFF
KNOWN_KEYS = ("run_as", "caps", "writable", "no_new_privileges")

# Linux capability numbers (linux/capability.h), for names and masks.
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip


@dataclass(frozen=True)
class Profile:
    name: str
    run_as: str = ""  # "" = root
    caps: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    no_new_privileges: bool = True


@dataclass(frozen=True)
class RunAs:
    """``run_as`` resolved against the user database."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = field(default=())
    home: str = "/"


def parse(
    entries: dict[str, dict[str, tuple[int, str]]], path: str, warnings: list[str]
) -> dict[str, Profile]:
    """``{name: {key: (line, value)}}`` from the config file into checked profiles."""
    out: dict[str, Profile] = {}
    for name, keys in entries.items():
        run_as, nnp = "", True
        caps: tuple[str, ...] = ()
        writable: tuple[str, ...] = ()
        for key, (line, value) in keys.items():
            if key == "run_as":
                run_as = _run_as(value, name, path, line)
            elif key == "caps":
                caps = _caps(value, name, path, line)
            elif key == "writable":
                writable = _writable(value, name, path, line)
            elif key == "no_new_privileges":
                nnp = value.strip().lower() in ("1", "y", "yes", "true", "on")
            else:
                warnings.append(f"{path}:{line}: profile '{name}': unknown key '{key}' ignored")
        out[name] = Profile(name, run_as, caps, writable, nnp)
    return out


def _run_as(value: str, name: str, path: str, line: int) -> str:
    if value and not RUN_AS_RE.match(value):
        raise ConfigError(f"profile '{name}': invalid run_as {value!r}", path, line)
    if value.isdigit() and int(value) > MAX_UID:
        raise ConfigError(f"profile '{name}': run_as uid {value} is out of range", path, line)
    return value


def _caps(value: str, name: str, path: str, line: int) -> tuple[str, ...]:
    caps = tuple(c for c in re.split(r"[,\s]+", value.strip()) if c)
    for c in caps:
        if not CAP_RE.match(c):
            raise ConfigError(f"profile '{name}': invalid capability {c!r} (expected CAP_*)",
                              path, line)  # fmt: skip
        if c not in CAPABILITIES:
            raise ConfigError(f"profile '{name}': unknown capability {c!r}", path, line)
    return tuple(dict.fromkeys(caps))


def _writable(value: str, name: str, path: str, line: int) -> tuple[str, ...]:
    paths = tuple(p for p in value.split(":") if p.strip())
    for p in paths:
        if not p.startswith("/") or "\0" in p:
            raise ConfigError(f"profile '{name}': writable path must be absolute: {p!r}",
                              path, line)  # fmt: skip
    return tuple(os.path.normpath(p) for p in paths)


def resolve_user(run_as: str) -> RunAs:
    """Look ``run_as`` up ("" is root). A numeric uid without a passwd entry runs with
    gid = uid and no supplementary groups, as upstream. KeyError names what is unknown."""
    if not run_as:
        run_as = "root"
    try:
        pw = pwd.getpwuid(int(run_as)) if run_as.isdigit() else pwd.getpwnam(run_as)
    except KeyError:
        if run_as.isdigit():
            uid = int(run_as)
            return RunAs(run_as, uid, uid, (uid,), "/")
        raise KeyError(f"unknown run_as user '{run_as}'") from None
    groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    return RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid, groups, pw.pw_dir or "/")


def can_execute(path: str, user: RunAs, dac_override: bool = False) -> str:
    """Why ``user`` cannot execute the script at ``path`` ("" when it can), from the
    mode bits: search permission on every parent, execute (and read, for a ``#!`` script
    that an interpreter must open) on the file. Root is bound by the mode bits like anyone
    unless the profile keeps ``CAP_DAC_OVERRIDE`` (``dac_override``). ACLs are not
    consulted."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    if not os.path.isfile(path):
        return "not a regular file"

    def allowed(mode: int, uid: int, gid: int, bits: int) -> bool:
        if dac_override:
            return not bits & 1 or bool(mode & 0o111)
        if uid == user.uid:
            shift = 6
        elif gid == user.gid or gid in user.groups:
            shift = 3
        else:
            shift = 0
        return (mode >> shift) & bits == bits

    parent = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            dst = os.stat(parent)
        except OSError as exc:
            return f"{parent}: {exc.strerror}"
        if not allowed(dst.st_mode, dst.st_uid, dst.st_gid, 1):
            return f"directory {parent} is not searchable"
        if parent == "/":
            break
        parent = os.path.dirname(parent)
    need = 1
    try:
        with open(path, "rb") as fh:
            if fh.read(2) == b"#!":
                need = 5
    except OSError:
        pass
    if not allowed(st.st_mode, st.st_uid, st.st_gid, need):
        what = "read and execute" if need == 5 else "execute"
        return (
            f"no {what} permission (mode {st.st_mode & 0o7777:04o}, owner {st.st_uid}:{st.st_gid})"
        )
    return ""


def describe(p: Profile) -> str:
    """One line for ``self-check`` and logs."""
    bits = [f"run_as {p.run_as or 'root'}", f"caps {','.join(p.caps) or 'none'}"]
    bits.append(f"writable {':'.join(p.writable)} and /tmp" if p.writable
                else "writable: all but the agent's own directories")  # fmt: skip
    bits.append("no_new_privileges" if p.no_new_privileges else "new privileges allowed")
    return ", ".join(bits)


def undefined(wanted: dict[str, str], defs: dict[str, Profile]) -> list[str]:
    """``wanted`` maps script names to profile names: one message per script whose
    profile is not defined (upstream 0.12.2: a fatal config error in executor mode)."""
    return [f"script '{s}': profile '{p}' is not defined in agent.conf"
            for s, p in sorted(wanted.items()) if p not in defs]  # fmt: skip
