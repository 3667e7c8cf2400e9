"""The one call the run path makes when a run finishes: :func:`record_run`.

It never fails a run: the scripts ran, so an error here (a full disk, a bad directory)
is logged (``history-record-failed``) and the results still go back. A run that every
agent refused (``script not permitted``: a made-up script name) is counted in
``refused.json`` rather than kept, so callers inventing names cannot grow the history
(nor the run store: the caller skips its record too), and the run's lock files are
removed (:func:`dispatcher.runlocks.discard`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent.common import logfmt
from dispatcher.history import records as hr
from dispatcher.history.store import for_config

if TYPE_CHECKING:
    from dispatcher.core import Dispatcher
    from dispatcher.operations import Caller

REFUSED_ERROR = "script not permitted"


def refused_everywhere(results: Sequence[Mapping[str, Any]], outcomes: Mapping[str, str]) -> bool:
    """True when no host ran the script because every agent refused it (unknown
    references aside), so the run is only counted."""
    refused = 0
    for res in results:
        outcome = outcomes.get(str(res.get("host", "")))
        if outcome == "unknown":
            continue
        err = res.get("error")
        if outcome != "denied" or not (isinstance(err, str) and err.startswith(REFUSED_ERROR)):
            return False
        refused += 1
    return refused > 0


def record_run(
    d: Dispatcher,
    caller: Caller,
    *,
    reqid: str,
    script: str,
    args: Sequence[str],
    async_: bool,
    results: Sequence[Mapping[str, Any]],
    outcomes: Mapping[str, str],
    started: float,
) -> bool:
    """Keep the run in this instance's history; True when it was refused everywhere (only
    counted: the caller then keeps no run-store record either)."""
    cfg = d.cfg
    store = for_config(cfg)
    try:
        if refused_everywhere(results, outcomes):
            from dispatcher.runlocks import discard

            names = [
                str(r.get("host")) for r in results if outcomes.get(str(r.get("host"))) != "unknown"
            ]
            discard(cfg.locks_dir, [(name, script) for name in names])
            n = store.count_refused(script)
            logfmt.event("history-refused", logfmt.WARNING, reqid=reqid, script=script[:200],
                         refused_total=n, reason="every agent refused the script")  # fmt: skip
            return True
        user = hr.who(caller.kind, caller.username, caller.identity, caller.sudo_user)
        extra = {"source_ip": caller.source_ip} if caller.kind == "api" else {}
        if caller.kind == "cli" and caller.sudo_user and caller.identity:
            extra["unix_user"] = caller.identity
        rec = hr.build(
            reqid=reqid, mode="async" if async_ else "sync", via=caller.kind, script=script,
            args=args, args_policy=cfg.history_args, user=user, results=results,
            outcomes=outcomes, started=started, finished=time.time(),
            instance=cfg.instance_id, output_max=cfg.history_output_max, extra=extra,
        )  # fmt: skip
        store.save(rec)
    except (OSError, ValueError) as exc:
        logfmt.event("history-record-failed", logfmt.ERROR, reqid=reqid, script=script[:200],
                     error=f"{type(exc).__name__}: {exc}")  # fmt: skip
    return False
