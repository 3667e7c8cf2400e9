"""Apply a profile: a mount namespace per profile, resource limits, then the script's
credentials, switched in the child before its one exec.

**Mount namespace.** For each profile the executor builds one mount namespace (in a short
lived child, then kept alive by an open ``/proc/PID/ns/mnt`` descriptor) and starts the
profile's scripts in it: mount propagation private; when the profile lists ``writable``
paths, every mount read-only (``mount_setattr`` with ``AT_RECURSIVE``, Linux 5.12+), a
tmpfs on ``/tmp`` private to the profile, and the listed paths bound read-write again;
the agent's own directories (config, allowlist, state, socket) bound read-only on top,
whatever the profile says. Namespaces are rebuilt when the config or the host's mount
table changes (checked at each run with one ``poll`` of an open ``/proc/self/mountinfo``,
:class:`MountWatch`; until then a built namespace keeps its copies of the mounts it was
made from, so a filesystem unmounted on the host stays busy until the next run or a
SIGHUP). Building one per run cost 10-20 ms under load (namespace teardown).

**Start.** A profile's scripts are forked by its spawner (:mod:`agent.executor.spawner`), a
small root process the executor starts once per profile (a fork of the ~23 MB executor
cost 2-3 ms of CPU; ``vfork`` cannot be used because the credentials must change in the
child). The spawner's bounding set is already the profile's and it sits in the profile's
namespace; it forks with ``clone3(CLONE_PARENT)``, so the script is the executor's own
child (reaped, signalled and timed out by it as before). The child starts a session, puts
the three pipes on 0-2 and closes every other descriptor, lowers its soft
``RLIMIT_NOFILE`` to 1024, ``cd /``, restores ``SIGPIPE``/``SIGXFSZ``, switches to the
profile's credentials (:mod:`agent.executor.creds`: ``run_as`` with its groups, the
profile's capabilities as the only bounding, effective, permitted, inheritable and
ambient ones, ``no_new_privs``) and execs the script. It holds nothing but the profile's
capabilities at that exec, so the kernel checks it as ``run_as`` (126 when ``run_as`` may
not execute it, 127 when it does not exist: :class:`ExecError`). The executor's hard
limits, lowered once at start, are the scripts': ``RLIMIT_CORE`` 0, ``RLIMIT_NOFILE``
4096, ``RLIMIT_NPROC`` 4096 (binding a non-root ``run_as``). A profile that cannot be
applied fails closed: exit 126 and ``executor: profile could not be applied: ...`` on
stderr. :meth:`Plan.command` is the equivalent ``setpriv ... -- env`` command line (what
the executor ran before, kept as the tests' reference).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import io
import marshal
import os
import resource
import select
import signal
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.executor import creds
from agent.profiles import CAPABILITIES, Profile, RunAs

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
MAX_FD = 1 << 20  # above any descriptor the executor can hold (its hard RLIMIT_NOFILE)
ENOENT, ENOTDIR = errno.ENOENT, errno.ENOTDIR
LAST_CAP = creds.last_cap(len(CAPABILITIES) - 1)
SPAWN_HEADER = struct.Struct(">I")
SPAWNER_TIMEOUT = 10.0

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


class MountWatch:
    """The host's mount table, re-read only when it may have changed: the kernel flags
    an open ``/proc/self/mountinfo`` (``POLLPRI``) at every mount or unmount in the
    executor's namespace, so an unchanged table costs one ``poll``, not a read."""

    def __init__(self) -> None:
        self.fh: io.BufferedReader | None = None
        self.poller = select.poll()
        self.last = b""

    def current(self) -> bytes:
        if self.fh is None:
            self.fh = open("/proc/self/mountinfo", "rb")  # noqa: SIM115 - kept open
            self.poller.register(self.fh, select.POLLPRI | select.POLLERR)
            self.poller.poll(0)  # consume the event pending since the open
            self.last = self.fh.read()
        elif self.poller.poll(0):
            self.fh.seek(0)
            self.last = self.fh.read()
        return self.last

    def close(self) -> None:
        if self.fh is not None:
            self.poller.unregister(self.fh)
            self.fh.close()
            self.fh = None


@dataclass
class Namespaces:
    """The built namespaces, by profile; all dropped when the key (config files and the
    host's mount table) changes."""

    key: object = None
    fds: dict[str, int] = field(default_factory=dict)
    watch: MountWatch = field(default_factory=MountWatch)

    def _mounts(self) -> bytes:
        return self.watch.current()

    def get(self, key: object, profile: Profile, protected: Callable[[], Sequence[str]]) -> int:
        """The namespace of ``profile``, built (with the directories ``protected()``
        names read-only) when there is none for the current key."""
        mounts = self._mounts()
        if (key, mounts) != self.key:
            self.clear()
            self.key = (key, mounts)
        if profile.name not in self.fds:
            try:
                self.fds[profile.name] = build_namespace(profile, protected())
            except OSError as exc:
                raise SandboxError(f"cannot build the mount namespace: {exc}") from None
        return self.fds[profile.name]

    def clear(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def lower_own_limits() -> None:
    """At start: the executor's hard limits become the scripts' (``RLIMIT_CORE`` 0,
    ``RLIMIT_NOFILE`` 4096, ``RLIMIT_NPROC`` 4096, which binds a non-root ``run_as`` and
    not root). Only lowered, never raised: that needs no ``CAP_SYS_RESOURCE``."""
    for res, soft, hard in LIMITS:
        old = resource.getrlimit(res)
        hard = hard if old[1] == resource.RLIM_INFINITY else min(hard, old[1])
        resource.setrlimit(res, (min(soft, hard), hard))


class ExecError(Exception):
    """The child could not exec the script (``errno`` from ``execve``)."""

    def __init__(self, path: str, errno: int) -> None:
        super().__init__(f"{path}: {os.strerror(errno)}")
        self.path, self.errno = path, errno

    @property
    def exit(self) -> int:
        """127 when the script does not exist, 126 otherwise (as ``env`` had it)."""
        return 127 if self.errno in (ENOENT, ENOTDIR) else 126


class Proc:
    """A child started by :func:`start`: its pid and, once reaped, its exit status
    (negative: killed by that signal), as ``subprocess.Popen`` has them."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll_exit(self) -> int:
        """Reap the child (it has exited: its pidfd is readable)."""
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


class Spawner:
    """The executor's handle on its spawner process (:mod:`agent.executor.spawner`),
    started on first use and again after it went away."""

    def __init__(self, keep: tuple[int, ...] = ()) -> None:
        self.keep = keep  # its bounding set: the capabilities of the profile it serves
        self.sock: socket.socket | None = None
        self.pid = 0
        self.pidfd = -1

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = (f"import sys; sys.path.insert(0, {root!r}); "
                f"from agent.executor.spawner import main; main({self.keep!r})")  # fmt: skip
        # Above 3 first: a dup2 onto itself would leave it close-on-exec.
        high = fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
        try:
            self.pid = os.posix_spawn(
                sys.executable, [sys.executable, "-I", "-S", "-c", code], {"LC_ALL": "C.UTF-8"},
                file_actions=[(os.POSIX_SPAWN_DUP2, high, 3)], setsid=True,
            )  # fmt: skip
        finally:
            os.close(high)
            theirs.close()
        ours.settimeout(SPAWNER_TIMEOUT)
        self.sock = ours
        # Reaped as soon as it dies, not at the next run of its profile.
        self.pidfd = os.pidfd_open(self.pid)
        with contextlib.suppress(RuntimeError):  # no running loop: reaped by close()
            asyncio.get_running_loop().add_reader(self.pidfd, self.close)
        return ours

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pidfd >= 0:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0

    def spawn(self, fds: Sequence[int], c: creds.Creds, path: str, argv: list[str],
              env: dict[str, str]) -> None:  # fmt: skip
        """Ask for a new child of the executor that gets ``fds`` (namespace, stdin,
        stdout, stderr, report) and ``c`` and execs ``path``. The answer comes on the
        report pipe (:func:`start`), not here."""
        payload = marshal.dumps((c.astuple(), path, argv, env))
        head = SPAWN_HEADER.pack(len(payload))
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        for attempt in (1, 2):
            sock = self.sock or self._start()
            try:
                sock.sendmsg([head], rights)
                break
            except OSError as exc:
                # Not received (the spawner has gone away): start another, once.
                self.close()
                if attempt == 2:
                    raise SandboxError(f"spawner unavailable: {exc}") from None
        try:
            sock.sendall(payload)
        except OSError as exc:
            self.close()
            raise SandboxError(f"spawner failed: {exc}") from None


def _read_report(spawner: Spawner, fd: int) -> bytes:
    """The report pipe's content up to EOF: the child's pid then, only on failure,
    ``stage:errno:message`` (pid 0: the spawner's own failure; nothing: it died)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    report = b""
    while True:
        if not poller.poll(SPAWNER_TIMEOUT * 1000):
            spawner.close()
            raise SandboxError("spawner failed: no answer in time")
        chunk = os.read(fd, 4096)
        if not chunk:
            return report
        report += chunk


def start(spawner: Spawner, nsfd: int, c: creds.Creds, path: str, argv: list[str],
          env: dict[str, str]) -> tuple[Proc, tuple[int, int, int]]:  # fmt: skip
    """Have ``spawner`` start a child of the executor that enters the namespace
    ``nsfd``, takes the credentials ``c`` and execs ``path``; returns it with the
    executor's ends of its stdin, stdout and stderr pipes once the exec succeeded.
    ExecError when the exec failed, SandboxError when anything before it did (the child
    is reaped either way)."""
    fds: list[int] = []
    try:
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(4)]
        fds = [fd for pair in pipes for fd in pair]
        (in_r, in_w), (out_r, out_w), (err_r, err_w), (rep_r, rep_w) = pipes
        spawner.spawn((nsfd, in_r, out_w, err_w, rep_w), c, path, argv, env)
        for fd in (in_r, out_w, err_w, rep_w):
            os.close(fd)
            fds.remove(fd)
        # EOF once both the spawner and the child (close-on-exec: at the exec) closed it.
        first, _, failure = _read_report(spawner, rep_r).partition(b"\n")
        try:
            pid = int(first)
        except ValueError:
            spawner.close()
            raise SandboxError("spawner failed: it went away") from None
        proc = Proc(pid) if pid > 0 else None
        if proc is None or failure:
            if proc is not None:
                proc.poll_exit()
            stage, err, msg = failure.decode(errors="replace").split(":", 2)
            if stage == "exec" and int(err):
                raise ExecError(path, int(err))
            raise SandboxError(f"spawner: {msg}" if stage == "spawner" else msg)
        for fd in (in_w, out_r, err_r):
            fds.remove(fd)
        return proc, (in_w, out_r, err_r)
    finally:
        for fd in fds:
            os.close(fd)


@dataclass
class Started:
    """A child started outside asyncio, wired to the running loop (see
    :class:`agent.runner.Child`)."""

    proc: Proc
    stdin: asyncio.StreamWriter | None
    stdout: asyncio.StreamReader | None
    stderr: asyncio.StreamReader | None
    exited: asyncio.Future[int]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)


async def wire(proc: Proc, ends: tuple[int, int, int]) -> Started:
    """Connect a started child's pipes and exit to the running loop (a pidfd, no thread)."""
    loop = asyncio.get_running_loop()
    files = [open(ends[0], "wb", buffering=0, closefd=True)]  # noqa: SIM115 - transports own them
    files += [open(fd, "rb", buffering=0, closefd=True) for fd in ends[1:]]  # noqa: SIM115

    async def reader(pipe: object) -> asyncio.StreamReader:
        r = asyncio.StreamReader(limit=2**16)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(r), pipe)
        return r

    exited: asyncio.Future[int] = loop.create_future()
    pidfd = os.pidfd_open(proc.pid)

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        rc = proc.poll_exit()
        if not exited.done():
            exited.set_result(rc)

    loop.add_reader(pidfd, reap)
    out, err = await reader(files[1]), await reader(files[2])
    transport, proto = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, files[0])
    stdin = asyncio.StreamWriter(transport, proto, None, loop)
    return Started(proc, stdin, out, err, exited)


@dataclass(frozen=True)
class Plan:
    """How one run of a script under ``profile`` as ``user`` is started."""

    profile: Profile
    user: RunAs

    def command(self, path: str, args: Sequence[str]) -> list[str]:
        """The util-linux equivalent of this plan, ``setpriv ... -- env -- path args``
        (identity, capabilities, no_new_privs): for reproducing a run by hand and as the
        reference the tests compare :mod:`agent.executor.creds` with. Not used to run."""
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

    @functools.cached_property
    def credentials(self) -> creds.Creds:
        """The credentials the script gets (computed once per plan)."""
        caps = tuple(sorted(CAPABILITIES.index(c) for c in self.profile.caps))
        drop = tuple(c for c in range(LAST_CAP + 1) if c not in caps)
        u = self.user
        return creds.Creds(u.uid, u.gid, tuple(u.groups), caps, drop,
                           self.profile.no_new_privileges)  # fmt: skip

    async def spawn(self, spawner: Spawner, nsfd: int, argv: list[str],
                    env: dict[str, str]) -> Started:  # fmt: skip
        """Start ``argv`` (``argv[0]`` is the script's path) in the namespace ``nsfd``
        with this plan's credentials: one fork (by the spawner), one exec."""
        proc, ends = start(spawner, nsfd, self.credentials, argv[0], argv, env)
        try:
            return await wire(proc, ends)
        except BaseException:
            proc.kill()
            proc.poll_exit()
            raise
