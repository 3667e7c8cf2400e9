"""``ced check-config``: the instance's configuration checked without starting anything.

The same check as ``ctrl-exec-api --check-config`` (:func:`dispatcher.config.check`): the
parse and every rule, the API certificate files, no network, no etcd, no port bound.
Exit 0 (``PATH: OK``) or 78 (every problem as ``file:line: message`` on stderr).
"""

from __future__ import annotations

from dispatcher.ced.invocation import Invocation
from dispatcher.ced.output import err, out, out_json
from dispatcher.errors import ExitCode


def cmd_check_config(inv: Invocation) -> ExitCode:
    from dispatcher.config import check, default_config_path

    path = inv.ns.config or default_config_path()
    problems = check(path)
    if inv.json:
        out_json({"ok": 0 if problems else 1, "config": path, "problems": problems})
    elif not problems:
        out(f"{path}: OK")
    for line in problems:
        err(line)
    return ExitCode.CONFIG if problems else ExitCode.OK
