"""``ced server [status|stop]``: this user's command server (:mod:`dispatcher.ced.cmdserver`).

``status`` (the default) prints whether one serves this interpreter, code and place, its
pid and socket (exit 0), or that none runs (exit 1); ``stop`` ends it (exit 0, also when
none ran). A ``ced server`` never starts a server.
"""

from __future__ import annotations

import os

from dispatcher.ced.invocation import Invocation
from dispatcher.ced.output import out, out_json
from dispatcher.errors import ExitCode, UsageError


def cmd_server(inv: Invocation) -> ExitCode:
    from dispatcher.ced.cmdserver import running_pid, stop
    from dispatcher.ced.entry import socket_path

    words = inv.words or ["status"]
    if len(words) != 1 or words[0] not in ("status", "stop"):
        raise UsageError("server takes status or stop")
    mode = os.environ.get("CED_SERVER", "auto")
    path = socket_path(make=False)
    pid = running_pid(path) if path else None
    if words[0] == "stop":
        stopped = pid is None or stop(path or "")
        if inv.json:
            out_json({"ok": 1 if stopped else 0, "stopped": pid, "socket": path})
        elif pid is None:
            out("command server: none running")
        else:
            out(f"command server: {'stopped' if stopped else 'did not stop'} (pid {pid})")
        return ExitCode.OK if stopped else ExitCode.FAILURE
    if inv.json:
        out_json({"running": pid is not None, "pid": pid, "socket": path, "mode": mode})
    elif pid is not None:
        out(f"command server: running, pid {pid}\nsocket: {path}\nCED_SERVER={mode}")
    else:
        out(f"command server: not running\nCED_SERVER={mode} "
            "(auto: the next ced on a terminal starts one; 1: any ced; 0: never)")  # fmt: skip
    return ExitCode.OK if pid is not None else ExitCode.FAILURE
