"""Upstream's log line format on stdlib logging.

``ACTION=<action>`` first, then every other ``KEY=value`` sorted by key; values with
whitespace are double-quoted; ``None`` is empty. Sent to syslog (facility daemon) with the
program's ident, or to stderr when there is no syslog socket (or when asked). Records go
through a queue so a slow sink never stalls the event loop. Tokens are never logged.

A one-shot process (``ced``) calls :func:`setup` with ``queued=False``: each line is then
written at once, straight to the syslog socket or stderr, without the ``logging`` module
(which this module imports only when it needs it: several milliseconds of ``ced``'s
start-up). Levels are the ``logging`` numbers, also available here (:data:`WARNING`...).

:func:`context` adds fields to every event logged in a block (and in tasks and threads
started from it, which copy the context): the dispatcher puts the leader's epoch on every
line of a leader-only action this way.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging
    import logging.handlers
    import socket

# The logging module's level numbers, for callers that need no other part of it.
DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50

_LOGGER_NAME = "ctrl-exec"
_listener: logging.handlers.QueueListener | None = None
_direct: _DirectSink | None = None
_context: contextvars.ContextVar[tuple[tuple[str, Any], ...]] = contextvars.ContextVar(
    "ctrl_exec_log_context", default=()
)


def format_fields(action: str, fields: dict[str, Any]) -> str:
    parts = [f"ACTION={_quote(action)}"]
    for key in sorted(fields):
        parts.append(f"{key.upper()}={_quote(fields[key])}")
    return " ".join(parts)


def _quote(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        value = int(value)
    s = str(value)
    if any(c.isspace() for c in s):
        return f'"{s}"'
    return s


def logger() -> logging.Logger:
    import logging

    return logging.getLogger(_LOGGER_NAME)


def push_context(**fields: Any) -> contextvars.Token[tuple[tuple[str, Any], ...]]:
    """Add ``fields`` to every event of the current context; undo with :func:`pop_context`."""
    return _context.set(_context.get() + tuple(fields.items()))


def pop_context(token: contextvars.Token[tuple[tuple[str, Any], ...]]) -> None:
    _context.reset(token)


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every event logged inside the block (explicit fields win)."""
    token = push_context(**fields)
    try:
        yield
    finally:
        pop_context(token)


def event(action: str, level: int = INFO, **fields: Any) -> None:
    """Log one upstream-format event line."""
    sink, log = _direct, None
    if sink is not None:
        if level < sink.level:
            return
    else:
        log = logger()
        if not log.isEnabledFor(level):
            return
    extra = _context.get()
    if extra:
        fields = {**dict(extra), **fields}
    line = format_fields(action, fields)
    if log is not None:
        log.log(level, "%s", line)
    elif sink is not None:
        sink.emit(level, line)


def setup(ident: str, target: str = "auto", level: int = INFO, *, queued: bool = True) -> None:
    """Send the project's log to syslog (``target`` syslog/auto) or stderr.

    ``auto`` uses ``/dev/log`` when it exists and stderr otherwise. ``queued=False`` is
    for short-lived processes (``ced``): lines are written at once by the caller, with
    no listener thread and no ``logging`` module.
    """
    global _listener, _direct
    if _listener is not None:
        _listener.stop()
        _listener = None
    if _direct is not None:
        _direct.close()
        _direct = None
    use_syslog = target == "syslog" or (target == "auto" and os.path.exists("/dev/log"))
    if not queued:
        _direct = _DirectSink(ident, SYSLOG_SOCKET if use_syslog else None, level)
        return
    import logging

    handler: logging.Handler
    if use_syslog:
        from logging.handlers import SysLogHandler

        try:
            handler = SysLogHandler(address=SYSLOG_SOCKET, facility=SysLogHandler.LOG_DAEMON)
            handler.setFormatter(logging.Formatter(f"{ident}[{os.getpid()}]: %(message)s"))
        except OSError:
            use_syslog = False
    if not use_syslog:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{ident}[{os.getpid()}]: %(message)s"))
    import queue
    from logging.handlers import QueueHandler, QueueListener

    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    log = logger()
    for h in list(log.handlers):
        log.removeHandler(h)
    log.addHandler(QueueHandler(q))
    log.setLevel(level)
    log.propagate = False
    _listener = QueueListener(q, handler)
    _listener.start()


def shutdown() -> None:
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
    if _direct is not None:
        _direct.close()  # reopened if something still logs


SYSLOG_SOCKET = "/dev/log"
_FACILITY_DAEMON = 3
_SYSLOG_PRIORITY = {DEBUG: 7, INFO: 6, WARNING: 4, ERROR: 3, CRITICAL: 2}  # else warning


class _DirectSink:
    """What ``setup(queued=False)`` installs instead of logging handlers.

    The bytes are those of the handlers :func:`setup` otherwise configures: to syslog
    ``<priority>ident[pid]: line`` plus a NUL (``SysLogHandler``, facility daemon; a
    datagram socket, else a stream one; one reconnect on a send error), to stderr
    ``ident[pid]: line`` plus a newline. A line syslog refuses goes to stderr.
    """

    def __init__(self, ident: str, syslog: str | None, level: int) -> None:
        self.lock = threading.Lock()  # the blocking client logs from its worker threads
        self.level = level
        self.prefix = f"{ident}[{os.getpid()}]: "
        self.syslog = syslog
        self.sock: socket.socket | None = None
        if syslog is not None:
            try:
                self.sock = self._connect(syslog)
            except OSError:  # as setup(): no syslog socket, log to stderr
                self.syslog = None

    @staticmethod
    def _connect(address: str) -> socket.socket:
        import socket

        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                raise
        except OSError:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                raise
        return sock

    def emit(self, level: int, line: str) -> None:
        text = self.prefix + line
        with self.lock:
            if self.syslog is not None:
                prio = _FACILITY_DAEMON << 3 | _SYSLOG_PRIORITY.get(level, 4)
                data = f"<{prio}>{text}\0".encode()
                for _attempt in range(2):
                    try:
                        if self.sock is None:
                            self.sock = self._connect(self.syslog)
                        self.sock.send(data)
                        return
                    except OSError:
                        self._close()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        with self.lock:
            self._close()

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
