"""The executor's spawner: a small root process that forks each script for it.

Why: ``fork`` costs in proportion to the forking process's memory (page tables, then a
copy-on-write fault for every page either side writes afterwards). In the executor
(an asyncio server, ~23 MB) one fork cost 2-3 ms of CPU on the test machine; this
process imports little beyond ``ctypes``, ``marshal``, ``_socket`` and
:mod:`agent.executor.creds` (~10 MB), and its fork costs about 0.6 ms. The executor
cannot use ``vfork`` (``posix_spawn``) for a script: the credentials must be switched
in the child, which means running code there.

How: the executor starts one per profile (``posix_spawn``, ``python -I -S``, almost empty
environment) with one end of a socketpair as fd 3 and a bounding set of only the
profile's capabilities (dropped once here, not per run); it dies with the executor
(``PR_SET_PDEATHSIG``) or when the executor closes its end. For each run the executor
sends one request: a 4-byte length and a :mod:`marshal` payload (credentials, path,
argv, env), with five descriptors (``SCM_RIGHTS``): the profile's mount namespace (which
the spawner enters itself when it is not in it yet), the child's stdin, stdout and
stderr pipe ends and the report pipe. The spawner forks with ``clone3(CLONE_PARENT)``:
the script is the *executor's* child, exactly as if the executor had forked it (it reaps
it, holds its pid until then, and signals it), and the spawner has nothing to reap; it
then closes its copies of the descriptors and answers nothing on the socket. The child
(:func:`child`) makes a new session, puts the pipes on 0-2 and closes every other
descriptor, lowers ``RLIMIT_NOFILE``, ``cd /``, restores ``SIGPIPE``/``SIGXFSZ``, runs
:func:`agent.executor.creds.apply`, writes its pid to the report pipe and execs the
script. The executor reads the report pipe to EOF (close-on-exec: EOF means the exec
happened): the pid, then only on failure ``stage:errno:message`` (pid 0: the spawner's
own failure; nothing at all: the spawner died).

Only the executor holds the other end of the socketpair (close-on-exec in the
executor, closed in every child), so nothing else can ask this process for anything.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal.py would import enum
import _socket
import array
import contextlib
import ctypes
import fcntl
import gc
import marshal
import os
import resource
import struct

from agent.executor import creds

CLONE_NEWNS = 0x00020000
CLONE_PARENT = 0x00008000
SYS_CLONE3 = 435  # the same number on every architecture (new syscall table)
PR_SET_PDEATHSIG = 1
HEADER = struct.Struct(">I")
NFDS = 5
MAX_FD = 1 << 20
CHILD_NOFILE = 1024

_libc = ctypes.CDLL(None, use_errno=True)


class _CloneArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]  # fmt: skip


def clone_parent() -> int:
    """Fork, the new process being a child of this process's parent (the executor):
    0 in the child, its pid here. Single-threaded caller: nothing but the calling
    thread is copied, as with ``fork``."""
    # exit_signal must be 0 with CLONE_PARENT: the child inherits this process's
    # (SIGCHLD: the executor started it with posix_spawn).
    args = _CloneArgs(flags=CLONE_PARENT, exit_signal=0)
    pid = _libc.syscall(SYS_CLONE3, ctypes.byref(args), ctypes.sizeof(args))
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(pid)


def child(ends: tuple[int, int, int], report: int, c: creds.Creds, path: str,
          argv: list[str], env: dict[str, str]) -> None:  # fmt: skip
    """In the new child (already in the profile's mount namespace): session, stdio,
    descriptors, limits, credentials, exec. Never returns: a failure goes to ``report``
    as ``stage:errno:message``."""
    stage, me, announced = "session", os.getpid(), False
    try:
        os.setsid()
        stage = "stdio"
        # Above 2 first, so that no dup2 onto 0-2 below overwrites another's source.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) if fd < 3 else fd for fd in ends]
        for i, fd in enumerate(high):
            os.dup2(fd, i)
        os.closerange(3, report)
        os.closerange(report + 1, MAX_FD)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(CHILD_NOFILE, hard), hard))
        os.chdir("/")
        for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):  # ignored by Python, not by scripts
            _signal.signal(sig, _signal.SIG_DFL)
        stage = "creds"
        creds.apply(c)
        stage = "exec"
        os.write(report, b"%d\n" % me)  # the executor learns the pid with the exec's EOF
        announced = True
        os.execve(path, argv, env)
    except BaseException as exc:
        err = exc.errno if isinstance(exc, OSError) and exc.errno else 0
        try:
            head = b"" if announced else b"%d\n" % me
            os.write(report, head + f"{stage}:{err}:{exc}".encode()[:4000])
        finally:
            os._exit(127)
    os._exit(127)


def _recv_exact(sock: _socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _setns(nsfd: int) -> None:
    if _libc.setns(nsfd, CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def serve(fd: int, dropped: frozenset[int]) -> None:
    """Answer the executor's requests on ``fd`` until it goes away. ``dropped``: the
    capabilities already gone from this process's bounding set (and so from every
    child's), which the children need not drop again."""
    sock = _socket.socket(fileno=fd)
    ns = os.stat("/proc/self/ns/mnt").st_ino
    while True:
        try:
            # Close-on-exec, so that only the three dup2'd onto 0-2 reach the script
            # and the report pipe reaches EOF at the exec.
            head, anc, _, _ = sock.recvmsg(HEADER.size, _socket.CMSG_SPACE(NFDS * 4),
                                           _socket.MSG_CMSG_CLOEXEC)  # fmt: skip
        except OSError:
            return
        if not head:
            return  # the executor closed its end
        fds = array.array("i")
        for level, kind, data in anc:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % 4])
        try:
            (size,) = HEADER.unpack(head + _recv_exact(sock, HEADER.size - len(head)))
            (uid, gid, groups, caps, drop, nnp), path, argv, env = marshal.loads(
                _recv_exact(sock, size)
            )
            if len(fds) != NFDS:
                raise ValueError(f"expected {NFDS} descriptors, got {len(fds)}")
            drop = tuple(cap for cap in drop if cap not in dropped)
            c = creds.Creds(uid, gid, tuple(groups), tuple(caps), drop, bool(nnp))
            nsfd, in_r, out_w, err_w, rep_w = fds
            # This process enters the profile's namespace itself (once, and again when
            # the executor rebuilt it), so the child starts in it.
            if os.fstat(nsfd).st_ino != ns:
                _setns(nsfd)
                ns = os.fstat(nsfd).st_ino
            pid = clone_parent()
            if pid == 0:  # pragma: no cover - replaced by the script or reports and exits
                child((in_r, out_w, err_w), rep_w, c, path, argv, env)
        except EOFError:
            return
        except Exception as exc:  # reported to the executor, which fails the run closed
            if len(fds) == NFDS:
                with contextlib.suppress(OSError):
                    os.write(
                        fds[4], f"0\nspawner:0:{exc.__class__.__name__}: {exc}".encode()[:4000]
                    )
        finally:
            for f in fds:
                os.close(f)


def main(keep: tuple[int, ...] = ()) -> None:
    """Serve the executor on fd 3, with a bounding set of only ``keep`` (the
    capabilities of the profile this spawner serves)."""
    _libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the executor died before the line above
        return
    gc.disable()  # a collection in a child would touch (copy) the whole heap; no cycles here
    dropped = frozenset(c for c in range(creds.last_cap(40) + 1) if c not in keep)
    for cap in dropped:
        if _libc.prctl(creds.PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            return  # the executor's requests fail: it reports it and starts another
    serve(3, dropped)


if __name__ == "__main__":  # pragma: no cover - started by the executor
    main()
