"""Apply a profile to the child the executor forks, between fork and exec.

In the child (still root): a private mount namespace; when the profile lists ``writable``
paths, every mount read-only (``mount_setattr`` with ``AT_RECURSIVE``, Linux 5.12+), a
private tmpfs on ``/tmp`` and the listed paths bound read-write again; the agent's own
directories (config, allowlist, state) bound read-only on top whatever the profile says;
resource limits. Then it execs ``setpriv`` (util-linux), which switches to ``run_as`` with
its groups, sets the bounding, inheritable and ambient capabilities to the profile's list
and ``no_new_privs``, and execs ``env`` (coreutils), which execs the script: the exec of
the script is checked with the final identity (126 when run_as may not execute it, 127
when it does not exist). Anything that fails writes
``executor: profile could not be applied: ...`` to the script's stderr and exits 126 (fail
closed).
"""

from __future__ import annotations

import ctypes
import os
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.profiles import Profile, RunAs

SETPRIV = "/usr/bin/setpriv"
ENV = "/usr/bin/env"
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE, MS_BIND = 1, 2, 4, 0x4000, 0x40000, 0x1000
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new syscall table)
TMP_OPTIONS = b"mode=1777,size=25%"

# (resource, soft, hard); NPROC only for a non-root run_as (root ignores it anyway).
LIMITS = ((resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_NOFILE, 1024, 4096))
NPROC = (resource.RLIMIT_NPROC, 4096, 4096)

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


class SandboxError(Exception):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")


def _mount(src: bytes | None, target: str, fstype: bytes | None, flags: int,
           data: bytes | None = None) -> None:  # fmt: skip
    _check(_libc.mount(src, target.encode(), fstype, ctypes.c_ulong(flags), data),
           f"mount {target}")  # fmt: skip


def _setattr(target: str, set_: int = 0, clr: int = 0) -> None:
    attr = _MountAttr(set_, clr, 0, 0)
    rc = _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, target.encode(), AT_RECURSIVE,
                       ctypes.byref(attr), ctypes.sizeof(attr))  # fmt: skip
    _check(rc, f"mount_setattr {target}")


def _bind(path: str, rdonly: bool) -> None:
    _mount(path.encode(), path, None, MS_BIND | MS_REC)
    if rdonly:
        _setattr(path, set_=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    else:
        _setattr(path, clr=MOUNT_ATTR_RDONLY)


@dataclass(frozen=True)
class Plan:
    """Everything the child needs, computed in the executor before the fork."""

    profile: Profile
    user: RunAs
    protected: tuple[str, ...]  # the agent's own directories: always read-only

    def apply_mounts(self) -> None:
        _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        if self.profile.writable:
            _setattr("/", set_=MOUNT_ATTR_RDONLY)
            if "/tmp" not in self.profile.writable:
                _mount(b"tmpfs", "/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, TMP_OPTIONS)
            for path in self.profile.writable:
                if not os.path.isdir(path) and not os.path.isfile(path):
                    raise SandboxError(f"writable path {path} does not exist")
                _bind(path, rdonly=False)
        for path in self.protected:
            if os.path.exists(path):
                _bind(path, rdonly=True)

    def apply_limits(self) -> None:
        limits = LIMITS + ((NPROC,) if self.user.uid != 0 else ())
        for res, soft, hard in limits:
            cur_hard = resource.getrlimit(res)[1]
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
            resource.setrlimit(res, (min(soft, hard), hard))
        os.umask(0o022)

    def preexec(self) -> Callable[[], None]:
        def child() -> None:
            try:
                self.apply_mounts()
                self.apply_limits()
            except (SandboxError, OSError, ValueError) as exc:
                os.write(2, f"executor: profile could not be applied: {exc}\n".encode())
                os._exit(126)

        return child

    def command(self, path: str, args: Sequence[str]) -> list[str]:
        """``setpriv ... -- path args``: identity, capabilities, no_new_privs."""
        caps = "".join(f",+{c[4:].lower()}" for c in self.profile.caps)
        argv = [SETPRIV, f"--reuid={self.user.uid}", f"--regid={self.user.gid}"]
        argv.append(f"--groups={','.join(str(g) for g in self.user.groups)}"
                     if self.user.groups else "--clear-groups")  # fmt: skip
        argv += [f"--bounding-set=-all{caps}", f"--inh-caps=-all{caps}",
                 f"--ambient-caps=-all{caps}"]  # fmt: skip
        if self.profile.no_new_privileges:
            argv.append("--no-new-privs")
        # setpriv execs with the capabilities it still holds (it drops them in that exec),
        # so the script is not its direct target: ``env`` is, and env's exec of the
        # script is checked against run_as and the profile's capabilities only.
        return [*argv, "--", ENV, "--", path, *args]

    def env(self) -> dict[str, str]:
        from agent.runner import SAFE_PATH

        env = {"PATH": SAFE_PATH, "HOME": self.user.home, "USER": self.user.name,
               "LOGNAME": self.user.name}  # fmt: skip
        for k in ("LANG", "LC_ALL", "TZ"):
            if k in os.environ:
                env[k] = os.environ[k]
        return env
