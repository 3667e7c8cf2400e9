"""systemd's readiness protocol (``sd_notify``), standard library only.

The units are ``Type=notify``: ``systemctl start`` returns once the daemon is listening
(``READY=1``), so a command right after it (``self-ping``, a health check) never meets a
refused connection, and units ordered ``After=`` it start when it can serve. Without
``NOTIFY_SOCKET`` (not started by systemd) every call does nothing. Failures to send are
ignored, as libsystemd's ``sd_notify`` does: readiness is advice, never a reason to stop.
"""

from __future__ import annotations

import contextlib
import os
import socket


def notify(*states: str) -> bool:
    """Send ``states`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``); True if sent."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path  # "@": Linux abstract namespace
    message = "\n".join(states).encode()
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(message)
        return True
    return False
