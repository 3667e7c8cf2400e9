"""``ced``'s entry point: hand the command to the user's command server, else run it here.

Starting ``ced`` costs more in imports than in work: ``ssl`` alone (OpenSSL 3 initialising)
is about 20 ms, ``argparse``, ``typing`` and the verb's modules another 20, and with etcd
configured its client 120-190 ms more. The command server (:mod:`dispatcher.ced.cmdserver`)
has imported all that once; for every command it forks a child that runs the same
:func:`dispatcher.ced.main.main` with this process's arguments, working directory, umask,
environment and standard input, output and error (the descriptors themselves, passed over
the socket), so output, prompts, ``isatty`` and exit status are what they would be here.
This module therefore imports nothing but C modules: no ``ssl``, no ``socket`` (``enum``),
no ``signal`` (``enum`` again), no ``json`` (``re``).

Trust: the server is the same user's own process. Its socket lives in a directory of the
user's (``$XDG_RUNTIME_DIR/ctrl-exec``, else ``/run/user/UID/ctrl-exec``, else
``/tmp/ctrl-exec-UID``) that must be owned by the user, mode 0700 and not a symlink, and
both ends check the other's uid (``SO_PEERCRED``) before a byte of the request is sent: a
socket planted by somebody else is never used, and nobody else's command is ever served.

Falls back to running here, silently, whenever the server cannot serve: none is running,
it runs other code or in another place than this process (one server per interpreter,
code root, ``PYTHONPATH``, set of namespaces and cgroup; after an upgrade it finds its
modules changed, answers ``stale`` and exits), or any step fails before its child started
the command. Nothing runs twice: the client runs a command itself only when the server
said so or closed the connection before a child reported its pid.

``CED_SERVER``: ``auto`` (default) uses a running server, and starts one in the background
(for the next command) when ``ced`` runs on a terminal; ``1`` also starts one without a
terminal (scripts that call ``ced`` often; it lives in the caller's cgroup, so a systemd
unit's server ends with the unit); ``0`` never uses one. ``CED_SERVER_IDLE`` (seconds,
default 900) is how long an idle server waits before it exits.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # (no stub; "signal" costs enum)
import _socket
import os
import sys

#: protocol tag of a request; a server that speaks another answers ``stale``
PROTOCOL = "ced-cmd/1"
#: the most a request (arguments and environment) may take
MAX_REQUEST = 4 << 20
_INT = 4  # SCM_RIGHTS carries C ints
MAX_SOCKET_PATH = 108  # sizeof(sockaddr_un.sun_path), with its NUL


def code_root() -> str:
    """The directory holding the ``dispatcher`` package this process runs."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_key: str | None = None


def server_key() -> str:
    """What a server must share with its clients: interpreter, code root, import path, and
    where it runs: its namespaces (a ``ced`` in another network namespace must reach the
    agents through that network, not the server's) and its cgroup (a command of one
    systemd unit never runs in, nor dies with, another unit's)."""
    global _key
    if _key is not None:
        return _key
    where = []
    for ns in ("net", "mnt", "uts", "pid", "user", "ipc", "cgroup"):
        try:
            where.append(os.readlink(f"/proc/self/ns/{ns}"))
        except OSError:
            where.append("")
    try:
        with open("/proc/self/cgroup", "rb") as f:
            where.append(f.read().decode(errors="replace").strip())
    except OSError:
        where.append("")
    _key = "\n".join((sys.executable, code_root(), os.environ.get("PYTHONPATH", ""), *where))
    return _key


def _private_dir(path: str, make: bool) -> bool:
    """``path`` is a directory of ours, mode 0700, not a symlink (made so when ``make``)."""
    if make:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_mode & 0o170777) == 0o040700 and st.st_uid == os.geteuid()


def runtime_dir(make: bool = False) -> str | None:
    """The user's private directory for the server's socket (None: none can be trusted)."""
    uid = os.geteuid()
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{uid}"
    try:
        st = os.lstat(base)
        mine = st.st_uid == uid and (st.st_mode & 0o170077) == 0o040000
    except OSError:
        mine = False
    path = f"{base}/ctrl-exec" if mine else f"/tmp/ctrl-exec-{uid}"
    return path if _private_dir(path, make) else None


def socket_path(make: bool = False) -> str | None:
    """This interpreter's and code's server socket (by a CRC of :func:`server_key`)."""
    import binascii  # a C module

    d = runtime_dir(make)
    if d is None:
        return None
    path = f"{d}/ced-{binascii.crc32(server_key().encode()):08x}.sock"
    return path if len(path.encode()) < MAX_SOCKET_PATH else None  # sun_path is 108 bytes


def peer_uid(sock: _socket.socket) -> int:
    """The uid of the process at the other end (``SO_PEERCRED``: pid, uid, gid)."""
    cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 3 * _INT)
    return int.from_bytes(cred[_INT : 2 * _INT], sys.byteorder)


def encode_request(argv: list[str]) -> bytes:
    """The request: NUL-separated fields (none of them can hold a NUL), length first."""
    env = [f"{k}={v}" for k, v in os.environ.items()]
    fields = [PROTOCOL, server_key(), os.getcwd(), str(_umask()), str(len(argv)), *argv, *env]
    body = "\0".join(fields).encode("utf-8", "surrogateescape")
    return len(body).to_bytes(_INT, "big") + body


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _start_server(path: str) -> None:
    """Start a server for the next command, detached; this one runs here meanwhile."""
    devnull = "/dev/null"
    try:
        os.posix_spawn(
            sys.executable,
            # -P: not the working directory first on sys.path (its own "dispatcher"!)
            [sys.executable, "-P", "-m", "dispatcher.ced.cmdserver", path],
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )
    except OSError:
        pass


class _Served(Exception):
    """The server's child ran the command: exit with ``code``."""

    def __init__(self, code: int) -> None:
        self.code = code


def _serve(path: str, argv: list[str], start: bool) -> None:
    """Have the server run ``argv``; raises :class:`_Served`, or returns (run it here)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        if _send(sock, path, argv, start):
            _relay(sock)
    finally:
        sock.close()


def _send(sock: _socket.socket, path: str, argv: list[str], start: bool) -> bool:
    """Connect to our server and send it the request and our stdin, stdout and stderr."""
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        if start:
            _start_server(path)
        return False
    except OSError:
        return False
    request = encode_request(argv)
    if len(request) > MAX_REQUEST:
        return False
    fds = b"".join(fd.to_bytes(_INT, sys.byteorder) for fd in (0, 1, 2))
    try:
        if peer_uid(sock) != os.geteuid():
            return False  # not our server: never hand it our terminal
        sent = sock.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        if sent < len(request):
            sock.sendall(request[sent:])
    except OSError:
        return False  # (a closed stdin, say): nothing ran
    return True


def _relay(sock: _socket.socket) -> None:
    """Forward signals to the child running the command until it reports its status."""
    child = 0
    buf = b""

    def forward(signum: int, _frame: object) -> None:
        if child:
            try:
                os.kill(child, signum)
            except OSError:
                pass

    while True:
        try:
            chunk = sock.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            if child:  # the child ended without a status: killed
                sys.stderr.write("ced: the command ended without an exit status\n")
                raise _Served(1)
            return  # refused before it forked (stale server): run here
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            word, _, value = line.decode().partition(" ")
            if word == "pid":
                child = int(value)
                for sig in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT):
                    _signal.signal(sig, forward)
            elif word == "exit":
                raise _Served(int(value))
            else:
                return  # "stale" or an answer we do not know: run here


def _special_interpreter() -> bool:
    """Started with options the server's interpreter does not have (``-X importtime``,
    ``-W``, ``-O``, dev mode, ...): such a ``ced`` runs its command itself."""
    f = sys.flags
    return bool(sys._xoptions or sys.warnoptions or f.optimize or f.dev_mode or f.isolated
                or f.ignore_environment or f.no_site or f.verbose or f.debug)  # fmt: skip


def main() -> int:
    argv = sys.argv[1:]
    mode = os.environ.get("CED_SERVER", "auto").lower()
    if mode not in ("0", "off", "no", "false") and not _special_interpreter():
        # a server is started by an interactive ced (or when asked): one started by a
        # script would outlive it in its service's cgroup; an existing one is always used
        start = mode in ("1", "on", "yes", "true") or os.isatty(2) or os.isatty(0)
        words = argv[: argv.index("--")] if "--" in argv else argv
        start = start and "server" not in words  # "ced server stop" starts none
        path = socket_path(make=start)
        if path is not None:
            try:
                _serve(path, argv, start)
            except _Served as done:
                return done.code
            except KeyboardInterrupt:  # before the child's pid came (then it gets the ^C)
                sys.stderr.write("Interrupted.\n")
                return 130
    from dispatcher.ced.main import main as run_here

    return run_here(argv)


if __name__ == "__main__":
    sys.exit(main())
