"""Upstream's log line format on stdlib logging.

``ACTION=<action>`` first, then every other ``KEY=value`` sorted by key; values with
whitespace are double-quoted; ``None`` is empty. Sent to syslog (facility daemon) with the
program's ident, or to stderr when there is no syslog socket (or when asked). Records go
through a queue so a slow sink never stalls the event loop. Tokens are never logged.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import sys
from typing import Any

_LOGGER_NAME = "ctrl-exec"
_listener: logging.handlers.QueueListener | None = None


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
    return logging.getLogger(_LOGGER_NAME)


def event(action: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one upstream-format event line."""
    log = logger()
    if log.isEnabledFor(level):
        log.log(level, "%s", format_fields(action, fields))


def setup(ident: str, target: str = "auto", level: int = logging.INFO) -> None:
    """Send the project's log to syslog (``target`` syslog/auto) or stderr.

    ``auto`` uses ``/dev/log`` when it exists and stderr otherwise.
    """
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
    handler: logging.Handler
    use_syslog = target == "syslog" or (target == "auto" and os.path.exists("/dev/log"))
    if use_syslog:
        try:
            handler = logging.handlers.SysLogHandler(
                address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
            )
            handler.setFormatter(logging.Formatter(f"{ident}[{os.getpid()}]: %(message)s"))
        except OSError:
            use_syslog = False
    if not use_syslog:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{ident}[{os.getpid()}]: %(message)s"))
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    log = logger()
    for h in list(log.handlers):
        log.removeHandler(h)
    log.addHandler(logging.handlers.QueueHandler(q))
    log.setLevel(level)
    log.propagate = False
    _listener = logging.handlers.QueueListener(q, handler)
    _listener.start()


def shutdown() -> None:
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
