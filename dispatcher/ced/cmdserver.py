"""The user's ``ced`` command server: imports once, forks a child per command.

Started in the background by :mod:`dispatcher.ced.entry` (``python -m
dispatcher.ced.cmdserver SOCKET``) when a ``ced`` finds none. It imports what ``ced``'s
verbs need (``ssl``, the fan-out, ``asyncio`` for many hosts, the etcd client when
installed), then for each connection from the same user (``SO_PEERCRED``) it receives the
request and the client's standard descriptors, and forks: the child takes those
descriptors as its 0, 1 and 2, the client's working directory, umask, environment and
arguments, reports its pid (the client forwards its signals there) and runs
:func:`dispatcher.ced.main.main` exactly as ``ced`` would, then reports the exit status.
Every command therefore starts from the same freshly imported state; nothing of one
command is seen by the next.

The server is single-threaded (it refuses to serve if an import started a thread: forking
a threaded process is not safe). One server per socket path (a lock beside it). It exits
after ``CED_SERVER_IDLE`` seconds without a command (default 900), and at the first
request after any module it imported changed on disk (an upgrade): that request is
answered ``stale`` and runs in the client instead. A child whose client went away (killed)
gets SIGINT, as if the operator had pressed Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback

from dispatcher.ced.entry import MAX_REQUEST, PROTOCOL, code_root, peer_uid, server_key

#: imported before serving, so a command does not pay for them
PRELOAD = (
    "dispatcher.ced.main",
    "dispatcher.ced.run",
    "dispatcher.ced.agents",
    "dispatcher.ced.history",
    "dispatcher.ced.checks",
    "dispatcher.ced.cluster",
    "dispatcher.ced.completion",
    "dispatcher.ced.verbhelp",
    "dispatcher.operations",
    "dispatcher.targets",
    "dispatcher.client.fanout",
    "dispatcher.client.blocking",
    "dispatcher.client.aio",
    "dispatcher.runlocks",
    "dispatcher.history.hook",
    "dispatcher.history.store",
    "dispatcher.history.view",
    "agent.common.tlsconf",
    "agent.common.datefmt",
    "agent.version",
    "asyncio",
    "subprocess",
    "pwd",
    "cluster.etcd",  # the etcd client (the dispatcher extra): 120-190 ms a command otherwise
)
DEFAULT_IDLE = 900.0
#: how often a waiting child looks whether its server is still there (else it exits)
ORPHAN_CHECK = 1.0
_INT = 4


def preload() -> list[str]:
    """Import :data:`PRELOAD` (what is not installed is skipped) and warm what every
    command would do first (argparse's patterns, OpenSSL's first context); the files of
    our modules, whose changes make the server stale."""
    import gc

    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    from agent.common.tlsconf import client_context
    from dispatcher.ced.main import parse

    parse(["run", "web1", "--tags", "role=web", "--batch", "1", "script", "--json"])
    client_context(None)  # OpenSSL fetches and caches its algorithms at the first context
    gc.collect()
    gc.freeze()  # a child's collections leave the inherited objects (and pages) alone
    return own_files()


def own_files() -> list[str]:
    """The files of every loaded module of ours (``agent``, ``dispatcher``, ``cluster``)."""
    root = code_root()
    ours = tuple(os.path.join(root, pkg) + os.sep for pkg in ("agent", "dispatcher", "cluster"))
    found = (getattr(module, "__file__", None) for module in list(sys.modules.values()))
    return sorted(path for path in found if path and path.startswith(ours))


def mtimes(paths: list[str]) -> list[float]:
    stamps = []
    for path in paths:
        try:
            stamps.append(os.stat(path).st_mtime)
        except OSError:
            stamps.append(-1.0)
    return stamps


def decode_request(body: bytes) -> tuple[str, int, list[str], dict[str, str]]:
    """(cwd, umask, argv, environment) of a request (ValueError: not ours or malformed)."""
    fields = body.decode("utf-8", "surrogateescape").split("\0")
    if len(fields) < 5 or fields[0] != PROTOCOL or fields[1] != server_key():
        raise ValueError("another protocol or another code")
    cwd, umask, argc = fields[2], int(fields[3]), int(fields[4])
    argv = fields[5 : 5 + argc]
    if len(argv) != argc:
        raise ValueError("truncated arguments")
    env = dict(f.split("=", 1) for f in fields[5 + argc :] if "=" in f)
    return cwd, umask, argv, env


class CommandServer:
    def __init__(self, path: str, idle: float) -> None:
        self.path, self.idle = path, idle
        self.files: list[str] = []
        self.mtimes: list[float] = []
        self.lock_fd = -1
        self.waiter = 0  # the child forked ahead, while it waits for a command
        self.bound: os.stat_result | None = None  # the socket file we made

    # ----- life --------------------------------------------------------------------------

    def run(self) -> int:
        self.lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another server has this socket
        os.ftruncate(self.lock_fd, 0)
        os.write(self.lock_fd, f"{os.getpid()}\n".encode())  # who serves (for stopping it)
        self.files = preload()
        self.mtimes = mtimes(self.files)
        if threading.active_count() != 1:
            return 1  # an import started a thread: forking would not be safe
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old)
        listener.listen(64)
        self.bound = os.stat(self.path)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
        signal.signal(signal.SIGTERM, _terminate)  # unlinks the socket on the way out
        try:
            self._loop(listener)
        finally:
            self._remove(listener)
        return 0

    def _loop(self, listener: socket.socket) -> None:
        """Keep one child forked ahead, waiting in ``accept``: a command does not wait for
        a fork. The child says when it took a connection (the next one is forked) or found
        the code changed (the server exits); the server exits after ``idle`` seconds in
        which nobody came."""
        failures = 0
        while True:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                self._wait_for_command(listener, w)  # never returns
            os.close(w)
            self.waiter = pid
            try:
                word = _read_word(r, self.idle)
                if word is None:  # idle: nobody new can connect, then a last look
                    self._unlink()
                    word = _read_word(r, 0.5)
            finally:
                os.close(r)
            if word is not None:
                self.waiter = 0  # it took a command, or it is gone: never kill that pid
            if word == b"a":  # it took a command (the last one, when idle)
                failures = 0
                if self.bound is None:
                    return
                continue
            if word == b"" and self.bound is not None:  # died without taking a command
                failures += 1
                if failures < 5:
                    time.sleep(0.1 * failures)  # fork another, not in a spin
                    continue
            return  # idle, stale (b"s"), or a child that keeps dying

    def _remove(self, listener: socket.socket) -> None:
        """Stop the waiting child, unlink the socket if it is still ours, and close it."""
        if self.waiter:
            with contextlib.suppress(OSError):
                os.kill(self.waiter, signal.SIGKILL)
        self._unlink()
        listener.close()

    def _unlink(self) -> None:
        """Remove our socket file (not a newer server's)."""
        made, self.bound = self.bound, None
        with contextlib.suppress(OSError):
            now = os.stat(self.path)
            if made is not None and (now.st_dev, now.st_ino) == (made.st_dev, made.st_ino):
                os.unlink(self.path)

    # ----- the waiting child --------------------------------------------------------------

    def _wait_for_command(self, listener: socket.socket, notify: int) -> None:
        """In the child forked ahead: take one command and run it; never returns."""
        try:
            os.close(self.lock_fd)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            parent = os.getppid()
            listener.settimeout(ORPHAN_CHECK)
            while True:
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    if os.getppid() != parent:  # the server was killed: nobody reaps us
                        os._exit(0)
                    continue
                conn.settimeout(None)
                request = self._take(conn)
                if request is None:
                    conn.close()
                    continue  # not a command of ours: wait for the next
                if mtimes(self.files) != self.mtimes:
                    with contextlib.suppress(OSError):
                        conn.sendall(b"stale\n")  # the client runs it itself
                    os.write(notify, b"s")
                    os._exit(0)
                os.write(notify, b"a")
                break
            os.close(notify)
            listener.close()
        except BaseException:
            os._exit(1)
        self._run_command(conn, *request)

    @staticmethod
    def _take(conn: socket.socket) -> tuple[list[int], str, int, list[str], dict[str, str]] | None:
        """A connection's request (descriptors, cwd, umask, argv, environment), if it is
        one from our user in our protocol; a client refused here runs the command itself."""
        fds: list[int] = []
        try:
            if peer_uid(conn) != os.geteuid():
                return None
            conn.settimeout(5.0)
            body, fds = _receive(conn)
            cwd, umask, argv, env = decode_request(body)
            conn.settimeout(None)
        except (OSError, ValueError):
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                conn.sendall(b"stale\n")
            return None
        return fds, cwd, umask, argv, env

    def _run_command(
        self, conn: socket.socket, fds: list[int], cwd: str, umask: int, argv: list[str],
        env: dict[str, str],
    ) -> None:  # fmt: skip
        """Become the client's ``ced`` and run ``argv``; report the pid, then the status."""
        code = 1
        done = threading.Event()
        try:
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            for fd in fds:
                if fd > 2:
                    os.close(fd)
            _standard_streams()
            os.environ.clear()
            os.environ.update(env)
            os.umask(umask)
            os.chdir(cwd)
            sys.argv = ["ced", *argv]
            conn.sendall(f"pid {os.getpid()}\n".encode())
            threading.Thread(target=_interrupt_when_gone, args=(conn, done), daemon=True).start()
            from dispatcher.ced.main import main

            code = main(argv)
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:  # a bug: its traceback goes where ced's would
            traceback.print_exc()
            code = 1
        finally:
            done.set()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            with contextlib.suppress(Exception):
                atexit._run_exitfuncs()
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {code}\n".encode())
            os._exit(code & 0xFF)


def _read_word(fd: int, timeout: float) -> bytes | None:
    """What the waiting child wrote (b"" when it died first); None after ``timeout``."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        return None
    return os.read(fd, 1)


def _terminate(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def running_pid(path: str) -> int | None:
    """The pid of the server serving ``path``, if one runs (it holds the lock)."""
    try:
        fd = os.open(f"{path}.lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return int(os.read(fd, 32).decode().strip() or 0) or None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def stop(path: str, timeout: float = 5.0) -> bool:
    """Stop the server of ``path`` (SIGTERM); True once none runs."""
    pid = running_pid(path)
    if pid is None:
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_pid(path) is None:
            return True
        time.sleep(0.02)
    return False


def _standard_streams() -> None:
    """New ``sys.stdin``/``stdout``/``stderr`` over descriptors 0-2, as Python makes them
    (the server's were made for ``/dev/null``: block-buffered, and seekable)."""
    enc = sys.stdout.encoding
    out_buf = 1 if os.isatty(1) else -1
    # they live as long as the process, as the interpreter's own do
    sys.stdin = open(0, encoding=enc, errors=sys.stdin.errors, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", out_buf, enc, sys.stdout.errors, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", 1, enc, "backslashreplace", closefd=False)  # noqa: SIM115


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    sys.stderr.write(f"{value}\n")
    return 1


def _interrupt_when_gone(conn: socket.socket, done: threading.Event) -> None:
    """The client went away (killed) before the command ended: interrupt it, as ^C would."""
    with contextlib.suppress(OSError):
        while conn.recv(64):
            pass
    if not done.is_set():
        os.kill(os.getpid(), signal.SIGINT)


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The request body and the three descriptors sent with it."""
    space = socket.CMSG_SPACE(3 * _INT)
    data, ancillary, _flags, _addr = conn.recvmsg(65536, space)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _INT
            fds += [int.from_bytes(payload[i : i + _INT], sys.byteorder)
                    for i in range(0, usable, _INT)]  # fmt: skip
    try:
        if len(fds) != 3 or len(data) < _INT:
            raise ValueError("a request carries stdin, stdout and stderr")
        size = int.from_bytes(data[:_INT], "big")
        if size > MAX_REQUEST:
            raise ValueError("request too large")
        body = bytearray(data[_INT:])
        while len(body) < size:
            chunk = conn.recv(min(65536, size - len(body)))
            if not chunk:
                raise ValueError("truncated request")
            body += chunk
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return bytes(body), fds


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m dispatcher.ced.cmdserver SOCKET\n")
        return 2
    try:
        idle = float(os.environ.get("CED_SERVER_IDLE", DEFAULT_IDLE))
    except ValueError:
        idle = DEFAULT_IDLE
    os.chdir("/")  # hold no directory (a mount) busy; each command enters its client's
    return CommandServer(args[0], max(idle, 1.0)).run()


if __name__ == "__main__":
    sys.exit(main())
