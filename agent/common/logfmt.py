r"""Upstream's log line format on stdlib logging.

``ACTION=<action>`` first, then every other ``KEY=value`` sorted by key; values with
whitespace are double-quoted; ``None`` is empty. Sent to syslog (facility daemon) with
the program's ident, or to stderr when there is no syslog socket (or when asked). Records go
through a queue so a slow sink never stalls the event loop. Tokens are never logged.

Beyond upstream (whose quoting does not escape), no value can forge a line or a field
(DESIGN.md section 3, "Logs"): a value that holds a double quote, a backslash, a control
character (C0, DEL, C1, so ``\r``, ``\n``, ``\t`` and NUL too), a line or paragraph
separator, any whitespace other than the plain space, an invisible format character (bidi
overrides, zero-width) or a lone surrogate is double-quoted with those characters
escaped: ``\"``, ``\\``, ``\n``, ``\r``, ``\t``, else ``\xNN`` / ``\uNNNN``. Values that
need none of this are written exactly as upstream writes them, so existing rules match.
Keys are upper-cased and limited to ``[A-Z][A-Z0-9_]*`` (at most 64): anything else, and
a field called ``ACTION``, is renamed ``KEY_<sanitised>`` (``_<n>`` appended on a clash).
:func:`parse_line` reads a line back. Free-text records of other loggers under
``ctrl-exec`` (the cluster modules) are escaped the same way by the handlers' formatter.

A one-shot process (``ced``) calls :func:`setup` with ``queued=False``: each line is then
written at once, straight to the syslog socket or stderr, without the ``logging`` module
(which this module imports only when it needs it: several milliseconds of ``ced``'s
start-up). Levels are the ``logging`` numbers, also available here (:data:`WARNING`...).

On stderr every line starts with an ISO 8601 UTC timestamp with milliseconds
(``2026-12-06T09:49:12.345Z ident[pid]: ACTION=...``; syslog and the journal stamp lines
themselves). ``setup(..., fmt="json")`` (the ``log_format = json`` key) writes one JSON
object per line instead: ``ts``, ``level``, ``ident``, ``pid``, ``action`` and every field
under its own lower-case name (a field that would shadow one of those is prefixed
``field_``). Records of other loggers under ``ctrl-exec`` become events too
(``ACTION=log LEVEL=... LOGGER=... MSG=...``), so every line is ``KEY=value``.

:func:`context` adds fields to every event logged in a block (and in tasks and threads
started from it, which copy the context): the dispatcher puts the leader's epoch on every
line of a leader-only action this way. :func:`request` is the same for a request id: set
where a request enters a process (the API gate, ``ced``, the agent's request, a request a
peer forwarded with its reqid), every line logged for the request carries ``REQID=``, free
text of other loggers included, so one ``grep REQID`` over every process's log follows
it; :func:`current_reqid` is that id (the dispatcher uses it as the run's reqid). A line
that names a different ``reqid`` of its own (a pairing request's id) keeps it and carries
the request's under ``REQUEST=``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
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
FORMATS = ("kv", "json")
_format = "kv"  # "kv" (upstream's KEY=value lines) or "json" (one object per line)
_LEVEL_NAMES = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error",
                CRITICAL: "critical"}  # fmt: skip
_RESERVED = frozenset({"ts", "level", "ident", "pid", "action"})
_listener: logging.handlers.QueueListener | None = None
_direct: _DirectSink | None = None
_context: contextvars.ContextVar[tuple[tuple[str, Any], ...]] = contextvars.ContextVar(
    "ctrl_exec_log_context", default=()
)


def format_fields(action: str, fields: dict[str, Any]) -> str:
    parts = [f"ACTION={_quote(action)}"]
    keys = _KEYS
    if not all(k in keys for k in fields):  # the usual case: keywords seen before
        keys = _safe_keys(fields)
    for key in sorted(fields, key=str):
        parts.append(f"{keys[key]}={_quote(fields[key])}")
    return " ".join(parts)


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    return value if type(value) is str else str(value)


def format_json(action: str, fields: dict[str, Any], level: int, ident: str, pid: int,
                ts: float) -> str:  # fmt: skip
    """One JSON object: ``ts``, ``level``, ``ident``, ``pid``, ``action``, then the fields."""
    import json

    doc: dict[str, Any] = {"ts": iso_time(ts), "level": _LEVEL_NAMES.get(level, str(level)),
                           "ident": ident, "pid": pid, "action": action}  # fmt: skip
    for key in sorted(fields, key=str):
        name = str(key).lower()
        while name in doc:
            name = f"field_{name}"
        doc[name] = _json_value(fields[key])
    return json.dumps(doc, ensure_ascii=True, separators=(",", ":"))


def iso_time(ts: float) -> str:
    """``2026-12-06T09:49:12.345Z`` (UTC, milliseconds)."""
    import time

    whole = int(ts)
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((ts - whole) * 1000):03d}Z"
    )


# Characters that make a value need quoting (the space) or escaping (everything else
# here): C0, DEL, C1, the quote and the backslash, Unicode whitespace and line breaks,
# invisible format characters that reorder or hide text, and lone surrogates.
_ESCAPED = (
    '\x00-\x1f\x7f-\xa0"\\\\\xad\u061c\u1680\u180e\u2000-\u200f\u2028-\u202f'
    "\u205f-\u2064\u2066-\u206f\u3000\ufeff\ufff9-\ufffb\ud800-\udfff"
)
# Compiled on first use (re's own cache): plain values (_plain) never need them, so a
# short-lived ``ced run`` does not pay for compiling these large classes (~1 ms).
_NEEDS_QUOTES = f"[ {_ESCAPED}]"
_NEEDS_ESCAPES = f"[{_ESCAPED}]"
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_KEY_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_KEYS: dict[str, str] = {}  # field name -> rendered key, for names that need no renaming


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    short = _SHORT_ESCAPES.get(c)
    if short is not None:
        return short
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def _quote(value: Any) -> str:
    if value is None:
        return ""
    if value is True or value is False:
        return "1" if value else "0"
    s = value if type(value) is str else str(value)
    if _plain(s):
        return f'"{s}"' if " " in s else s
    if re.search(_NEEDS_QUOTES, s) is None:
        return s
    if re.search(_NEEDS_ESCAPES, s) is None:
        return f'"{s}"'
    return '"' + re.sub(_NEEDS_ESCAPES, _escape_char, s) + '"'


def _plain(s: str) -> bool:
    """Printable ASCII without a quote or a backslash: nothing to escape (the space only
    quotes). The common case, decided without the regular expressions."""
    return s.isascii() and s.isprintable() and '"' not in s and "\\" not in s


def escape_text(text: str) -> str:
    """``text`` on one line: what :func:`_quote` escapes, escaped, without the quotes."""
    if _plain(text) or re.search(_NEEDS_ESCAPES, text) is None:
        return text
    return re.sub(_NEEDS_ESCAPES, _escape_char, text)


def _safe_keys(fields: dict[str, Any]) -> dict[Any, str]:
    """The rendered key of every field: unique, in the safe charset, never ``ACTION``."""
    out: dict[Any, str] = {}
    used = {"ACTION"}
    renamed: list[tuple[str, Any]] = []
    for key in sorted(fields, key=str):
        name = str(key).upper()
        if _KEY_RE.fullmatch(name) and name not in used:
            out[key] = name
            used.add(name)
            # cached only where no other name can map to the same key (lower case)
            if type(key) is str and key == name.lower() and len(_KEYS) < 4096:
                _KEYS[key] = name
        else:
            renamed.append((name, key))
    for name, key in renamed:
        base = "KEY_" + re.sub(r"[^A-Z0-9_]", "_", name)[:48]
        candidate, n = base, 1
        while candidate in used:
            n += 1
            candidate = f"{base}_{n}"
        used.add(candidate)
        out[key] = candidate
    return out


_UNESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)", re.DOTALL)
_UNSHORT = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def _unescape(m: re.Match[str]) -> str:
    s = m.group(1)
    if len(s) > 1:
        return chr(int(s[1:], 16))
    if s in _UNSHORT:
        return _UNSHORT[s]
    raise ValueError(f"unknown escape \\{s}")


def parse_line(line: str) -> tuple[str, dict[str, str]]:
    """``(action, {KEY: value})`` from a line :func:`format_fields` wrote.

    Raises ValueError on anything it could not have written. Values come back as the
    strings that were logged (``None`` as ``""``, ``True`` as ``"1"``).
    """
    if "\n" in line or "\r" in line:
        raise ValueError("more than one line")
    out: dict[str, str] = {}
    pos, first, action = 0, True, ""
    while pos < len(line):
        eq = line.find("=", pos)
        if eq < 0:
            raise ValueError(f"no '=' after {line[pos:]!r}")
        key = line[pos:eq]
        if not (_KEY_RE.fullmatch(key) and (key == "ACTION") == first):
            raise ValueError(f"bad key {key!r}")
        pos = eq + 1
        if line.startswith('"', pos):
            close = pos + 1
            while True:
                close = line.find('"', close)
                if close < 0:
                    raise ValueError("unterminated quote")
                backslashes = len(line[pos + 1 : close]) - len(line[pos + 1 : close].rstrip("\\"))
                if backslashes % 2 == 0:
                    break
                close += 1
            value = _UNESCAPE.sub(_unescape, line[pos + 1 : close])
            pos = close + 1
        else:
            end = line.find(" ", pos)
            end = len(line) if end < 0 else end
            value = line[pos:end]
            if '"' in value or "\\" in value:
                raise ValueError(f"unquoted value {value!r} needs quoting")
            pos = end
        if pos < len(line):
            if line[pos] != " ":
                raise ValueError(f"junk after the value of {key}")
            pos += 1
            if pos == len(line):
                raise ValueError("trailing space")
        if first:
            action, first = value, False
        elif key in out:
            raise ValueError(f"duplicate key {key}")
        else:
            out[key] = value
    if first:
        raise ValueError("no ACTION")
    return action, out


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


@contextlib.contextmanager
def request(reqid: str, **fields: Any) -> Iterator[None]:
    """Every event logged inside the block carries ``reqid`` (and ``fields``)."""
    with context(reqid=reqid, **fields):
        yield


def current_reqid() -> str:
    """The reqid of the request being handled in this context (:func:`request`), or ``""``."""
    for key, value in reversed(_context.get()):
        if key == "reqid":
            return str(value)
    return ""


def _with_context(extra: tuple[tuple[str, Any], ...], fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` plus the context's (explicit fields win; a different own ``reqid`` keeps
    the request's as ``request``)."""
    merged = {**dict(extra), **fields}
    own = fields.get("reqid")
    if own is not None and "request" not in fields:
        ctx = current_reqid()
        if ctx and str(own) != ctx:
            merged["request"] = ctx
    return merged


class _Line:
    """An event's ``ACTION=... KEY=...`` text, made only when a record's message is read
    (``getMessage``: other handlers, pytest's caplog); our handlers render the event."""

    __slots__ = ("action", "fields")

    def __init__(self, action: str, fields: dict[str, Any]) -> None:
        self.action, self.fields = action, fields

    def __str__(self) -> str:
        return format_fields(self.action, self.fields)


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
        fields = _with_context(extra, fields)
    if log is not None:
        line = _Line(action, fields) if _format == "kv" else action
        log.log(level, line, extra={"ce_event": (action, fields)})
    elif sink is not None:
        sink.emit(level, action, fields)


def setup(
    ident: str, target: str = "auto", level: int = INFO, *, queued: bool = True,
    fmt: str = "kv",
) -> None:  # fmt: skip
    """Send the project's log to syslog (``target`` syslog/auto) or stderr.

    ``auto`` uses ``/dev/log`` when it exists and stderr otherwise. ``queued=False`` is
    for short-lived processes (``ced``): lines are written at once by the caller, with
    no listener thread and no ``logging`` module. ``fmt``: ``kv`` or ``json``.
    """
    global _listener, _direct, _format
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    _format = fmt
    if _listener is not None:
        _listener.stop()
        _listener = None
    if _direct is not None:
        _direct.close()
        _direct = None
    use_syslog = target == "syslog" or (target == "auto" and os.path.exists("/dev/log"))
    unreachable = ""
    if not queued:
        _direct = _DirectSink(ident, SYSLOG_SOCKET if use_syslog else None, level)
        return
    import logging

    handler: logging.Handler
    if use_syslog:
        from logging.handlers import SysLogHandler

        try:
            handler = SysLogHandler(address=SYSLOG_SOCKET, facility=SysLogHandler.LOG_DAEMON)
            handler.setFormatter(_formatter(ident, stamped=False))
            # 3.11 swallows a failed connect here, then prints a traceback for every line
            sock = getattr(handler, "socket", None)  # (not in typeshed)
            if sock is None or sock.fileno() < 0:
                handler.close()
                unreachable = f"syslog socket {SYSLOG_SOCKET} not reachable: logging to stderr"
        except OSError as exc:
            unreachable = f"syslog socket {SYSLOG_SOCKET}: {exc}: logging to stderr"
        use_syslog = not unreachable
    if not use_syslog:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_formatter(ident, stamped=True))
    import queue
    from logging.handlers import QueueHandler, QueueListener

    class EventQueueHandler(QueueHandler):
        def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
            # an event's fields are its own dict of plain values: the listener's handler
            # renders it, once (QueueHandler renders every record in the caller's thread)
            return record if hasattr(record, "ce_event") else super().prepare(record)

    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    queued_handler = EventQueueHandler(q)
    queued_handler.addFilter(_keep_context)  # free text keeps the request's fields too
    log = logger()
    for h in list(log.handlers):
        log.removeHandler(h)
    log.addHandler(queued_handler)
    log.setLevel(level)
    log.propagate = False
    for name in ADOPTED:  # their warnings as events, not free text on stderr
        other = logging.getLogger(name)
        for h in list(other.handlers):
            if isinstance(h, QueueHandler):
                other.removeHandler(h)
        other.addHandler(queued_handler)
        other.propagate = False
    _listener = QueueListener(q, handler)
    _listener.start()
    if target == "syslog" and not use_syslog:
        event("log-target", WARNING, reason=unreachable)


#: Libraries whose records (warnings and up, their default level) become ``log`` events.
ADOPTED = ("uvicorn", "asyncio")


def _keep_context(record: logging.LogRecord) -> bool:
    """Give a free-text record the context it was logged in (formatted in another thread)."""
    if not hasattr(record, "ce_event"):
        record.ce_context = _context.get()
    return True


def _formatter(ident: str, stamped: bool) -> logging.Formatter:
    """What :func:`render` makes of each record (``stamped``: with a timestamp, for
    stderr); records of other loggers (free text) become ``log`` events."""
    import logging

    pid = os.getpid()

    class Lines(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            event = getattr(record, "ce_event", None)
            if event is None:
                text = record.getMessage()
                if record.exc_info:
                    text += "\n" + self.formatException(record.exc_info)
                fields = {"level": _LEVEL_NAMES.get(record.levelno, record.levelname),
                          "logger": record.name, "msg": text}  # fmt: skip
                extra = getattr(record, "ce_context", ())
                event = ("log", {**dict(extra), **fields} if extra else fields)
            return render(ident, pid, record.levelno, event[0], event[1], record.created,
                          stamped)  # fmt: skip

    return Lines()


def render(ident: str, pid: int, level: int, action: str, fields: dict[str, Any], ts: float,
           stamped: bool) -> str:  # fmt: skip
    """One log line as the current format writes it (without the newline): stamped for
    stderr; for syslog, after the ``ident[pid]: `` tag instead."""
    if _format == "json":
        doc = format_json(action, fields, level, ident, pid, ts)
        return doc if stamped else f"{ident}[{pid}]: {doc}"
    line = f"{ident}[{pid}]: {format_fields(action, fields)}"
    return f"{iso_time(ts)} {line}" if stamped else line


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
        self.ident, self.pid = ident, os.getpid()
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

    def emit(self, level: int, action: str, fields: dict[str, Any]) -> None:
        import time

        now = time.time()
        with self.lock:
            if self.syslog is not None:
                text = render(self.ident, self.pid, level, action, fields, now, False)
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
            sys.stderr.write(render(self.ident, self.pid, level, action, fields, now, True) + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        with self.lock:
            self._close()

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
