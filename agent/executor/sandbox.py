"""Apply a profile: a mount namespace per profile, resource limits, then setpriv and env.

**Mount namespace.** For each profile the executor builds one mount namespace (in a short
lived child, then kept alive by an open ``/proc/PID/ns/mnt`` descriptor) and starts the
profile's scripts in it: mount propagation private; when the profile lists ``writable``
paths, every mount read-only (``mount_setattr`` with ``AT_RECURSIVE``, Linux 5.12+), a
tmpfs on ``/tmp`` private to the profile, and the listed paths bound read-write again;
the agent's own directories (config, allowlist, state, socket) bound read-only on top,
whatever the profile says. Namespaces are rebuilt when the config or the host's mount
table changes (checked at each run; until then a built namespace keeps its copies of the
mounts it was made from, so a filesystem unmounted on the host stays busy until the next
run or a SIGHUP). Building one per run cost 10-20 ms under load (namespace teardown);
entering a built one costs two ``setns`` calls.

**Start.** The executor (single-threaded, so ``setns`` on itself is allowed) enters the
namespace, lowers its soft ``RLIMIT_NOFILE`` to the script's 1024, starts the child with
``subprocess.Popen`` (vfork, no Python code in the child) and restores both at once. Its
hard limits, lowered once at start, are the scripts': ``RLIMIT_CORE`` 0, ``RLIMIT_NOFILE``
4096, ``RLIMIT_NPROC`` 4096 (binding a non-root ``run_as``). The child is ``setpriv`` (util-linux): ``run_as`` with its groups, the bounding,
inheritable and ambient capability sets reduced to the profile's list, ``no_new_privs``;
it execs ``env`` (coreutils), which execs the script. setpriv's own exec still holds
root's capabilities, so the script is not its direct target: env's exec of the script is
checked against ``run_as`` and the profile's capabilities only (126 when ``run_as`` may
not execute it, 127 when it does not exist). A profile that cannot be applied fails
closed: exit 126 and ``executor: profile could not be applied: ...`` on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from agent.profiles import Profile, RunAs

SETPRIV = "/usr/bin/setpriv"
ENV = "/usr/bin/env"
CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE, MS_BIND = 2, 4, 0x4000, 0x40000, 0x1000
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new syscall table)
TMP_OPTIONS = b"mode=1777,size=25%"

# The executor's own (resource, soft, hard), inherited by every script; scripts start
# with the soft RLIMIT_NOFILE at CHILD_NOFILE. RLIMIT_NPROC does not bind root.
LIMITS = ((resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_NOFILE, 4096, 4096),
          (resource.RLIMIT_NPROC, 4096, 4096))  # fmt: skip
CHILD_NOFILE = 1024

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


class SandboxError(Exception):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise SandboxError(f"{what}: {os.strerror(ctypes.get_errno())}")


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


def setup_mounts(profile: Profile, protected: Sequence[str]) -> None:
    """In a fresh process: unshare the mount namespace and lay it out for ``profile``."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if profile.writable:
        _setattr("/", set_=MOUNT_ATTR_RDONLY)
        if "/tmp" not in profile.writable:
            _mount(b"tmpfs", "/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, TMP_OPTIONS)
        for path in profile.writable:
            if not os.path.exists(path):
                raise SandboxError(f"writable path {path} does not exist")
            _bind(path, rdonly=False)
    for path in protected:
        if os.path.exists(path):
            _bind(path, rdonly=True)


def build_namespace(profile: Profile, protected: Sequence[str]) -> int:
    """A descriptor of a new mount namespace laid out for ``profile`` (caller closes it)."""
    status_r, status_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 0
        try:
            os.close(status_r)
            os.close(hold_w)
            setup_mounts(profile, protected)
            os.write(status_w, b"ok")
            os.read(hold_r, 1)  # until the parent holds the namespace
        except BaseException as exc:
            os.write(status_w, f"{exc}".encode()[:4000] or b"failed")
            code = 1
        finally:
            os._exit(code)
    os.close(status_w)
    os.close(hold_r)
    try:
        status = os.read(status_r, 4096)
        if status != b"ok":
            raise SandboxError(status.decode(errors="replace") or "namespace builder died")
        return os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(status_r)
        os.close(hold_w)
        os.waitpid(pid, 0)


@dataclass
class Namespaces:
    """The built namespaces, by profile; all dropped when the key (config files and the
    host's mount table) changes."""

    key: object = None
    fds: dict[str, int] = field(default_factory=dict)
    own: int = -1

    def get(self, key: object, profile: Profile, protected: Sequence[str]) -> int:
        mounts = _mountinfo()
        if (key, mounts) != self.key:
            self.clear()
            self.key = (key, mounts)
        if profile.name not in self.fds:
            try:
                self.fds[profile.name] = build_namespace(profile, protected)
            except OSError as exc:
                raise SandboxError(f"cannot build the mount namespace: {exc}") from None
        return self.fds[profile.name]

    def clear(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    @contextlib.contextmanager
    def entered(self, fd: int) -> Iterator[None]:
        if self.own < 0:
            self.own = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        _check(_libc.setns(fd, CLONE_NEWNS), "setns")
        try:
            yield
        finally:
            # Coming back cannot fail for a single-threaded root process; if it ever
            # did, going on in the profile's namespace would be wrong: stop.
            if _libc.setns(self.own, CLONE_NEWNS) != 0:
                os.write(2, b"ctrl-exec-executor: cannot return to its mount namespace\n")
                os._exit(70)


def _mountinfo() -> bytes:
    with open("/proc/self/mountinfo", "rb") as fh:
        return fh.read()


def lower_own_limits() -> None:
    """At start: the executor's hard limits become the scripts' (``RLIMIT_CORE`` 0,
    ``RLIMIT_NOFILE`` 4096, ``RLIMIT_NPROC`` 4096, which binds a non-root ``run_as`` and
    not root). Only lowered, never raised: that needs no ``CAP_SYS_RESOURCE``."""
    for res, soft, hard in LIMITS:
        old = resource.getrlimit(res)
        hard = hard if old[1] == resource.RLIM_INFINITY else min(hard, old[1])
        resource.setrlimit(res, (min(soft, hard), hard))


@contextlib.contextmanager
def child_limits() -> Iterator[None]:
    """The executor's soft ``RLIMIT_NOFILE`` lowered to the scripts' while one starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(CHILD_NOFILE, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class Started:
    """A child started outside asyncio, wired to the running loop (see
    :class:`agent.runner.Child`)."""

    popen: subprocess.Popen[bytes]
    stdin: asyncio.StreamWriter | None
    stdout: asyncio.StreamReader | None
    stderr: asyncio.StreamReader | None
    exited: asyncio.Future[int]

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)


async def wire(popen: subprocess.Popen[bytes]) -> Started:
    """Connect a started child's pipes and exit to the running loop (a pidfd, no thread)."""
    loop = asyncio.get_running_loop()
    assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None

    async def reader(pipe: object) -> asyncio.StreamReader:
        r = asyncio.StreamReader(limit=2**16)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(r), pipe)
        return r

    exited: asyncio.Future[int] = loop.create_future()
    pidfd = os.pidfd_open(popen.pid)

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        rc = popen.wait()
        if not exited.done():
            exited.set_result(rc)

    loop.add_reader(pidfd, reap)
    out, err = await reader(popen.stdout), await reader(popen.stderr)
    transport, proto = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, popen.stdin)
    stdin = asyncio.StreamWriter(transport, proto, None, loop)
    return Started(popen, stdin, out, err, exited)


@dataclass(frozen=True)
class Plan:
    """How one run of a script under ``profile`` as ``user`` is started."""

    profile: Profile
    user: RunAs

    def command(self, path: str, args: Sequence[str]) -> list[str]:
        """``setpriv ... -- env -- path args``: identity, capabilities, no_new_privs."""
        caps = "".join(f",+{c[4:].lower()}" for c in self.profile.caps)
        argv = [SETPRIV, f"--reuid={self.user.uid}", f"--regid={self.user.gid}"]
        argv.append(f"--groups={','.join(str(g) for g in self.user.groups)}"
                     if self.user.groups else "--clear-groups")  # fmt: skip
        argv += [f"--bounding-set=-all{caps}", f"--inh-caps=-all{caps}",
                 f"--ambient-caps=-all{caps}"]  # fmt: skip
        if self.profile.no_new_privileges:
            argv.append("--no-new-privs")
        return [*argv, "--", ENV, "--", path, *args]

    def env(self) -> dict[str, str]:
        from agent.runner import SAFE_PATH

        env = {"PATH": SAFE_PATH, "HOME": self.user.home, "USER": self.user.name,
               "LOGNAME": self.user.name}  # fmt: skip
        for k in ("LANG", "LC_ALL", "TZ"):
            if k in os.environ:
                env[k] = os.environ[k]
        return env

    async def spawn(self, namespaces: Namespaces, nsfd: int, argv: list[str],
                    env: dict[str, str]) -> Started:  # fmt: skip
        with namespaces.entered(nsfd), child_limits():
            popen = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, cwd="/", start_new_session=True, close_fds=True,
            )  # fmt: skip
        try:
            return await wire(popen)
        except BaseException:
            popen.kill()
            popen.wait()
            raise
