"""``ced run``, ``ping``, ``status`` and ``wait``: the shared operations over the blocking client.

The operations are the API daemon's (:mod:`dispatcher.operations`), run by
:func:`~dispatcher.ced.invocation.dispatch`: no asyncio, no ``cryptography`` (unless an
agent certificate is due for renewal), no ``dataclasses`` and no ``logging`` module, for
a fast start (``bench/ced_bench.py``, ``tests/unit/dispatcher/test_cli_imports.py``).
"""

from __future__ import annotations

import os
from typing import Any

from dispatcher.ced.invocation import Invocation, dispatch
from dispatcher.ced.output import (
    err,
    exit_of,
    format_async_submit,
    format_ping,
    format_run,
    format_status,
    out_json,
)
from dispatcher.errors import ExitCode


def _all_ok(results: list[dict[str, Any]]) -> ExitCode:
    return ExitCode.OK if all(exit_of(r.get("exit")) == 0 for r in results) else ExitCode.FAILURE


def cmd_run(inv: Invocation) -> ExitCode:
    from dispatcher.operations import do_run

    inv.need(2, "run <host>[:<port>] [<host>...] <script> [-- <arg>...]")
    hosts, script = inv.words[:-1], inv.words[-1]
    d, caller = inv.d, inv.caller()
    res = dispatch(lambda io: do_run(d, caller, hosts, script, inv.script_args,
                                     async_=inv.ns.async_, default_port=inv.default_port, io=io))  # fmt: skip
    results: list[dict[str, Any]] = res["results"]
    if inv.ns.async_:
        if inv.json:
            out_json({"ok": 1, "reqid": res["reqid"], "results": results})
        else:
            format_async_submit(res["reqid"], results)
        accepted = any(r.get("status") == "accepted" for r in results)
        return ExitCode.OK if accepted else ExitCode.FAILURE
    if inv.json:
        out_json({"ok": 1, "results": results})
    else:
        format_run(results)
    return _all_ok(results)


def cmd_ping(inv: Invocation) -> ExitCode:
    from dispatcher.operations import do_ping

    inv.need(1, "ping <host>[:<port>] [<host>...]")
    d, caller = inv.d, inv.caller()
    res = dispatch(lambda io: do_ping(d, caller, inv.words, renew=True,
                                      default_port=inv.default_port, io=io))  # fmt: skip
    if inv.json:
        out_json({"ok": 1, "results": res["results"]})
    else:
        format_ping(res["results"])
    return ExitCode.OK


def _not_found(inv: Invocation, reqid: str) -> ExitCode:
    if inv.json:
        out_json({"ok": 0, "error": "not found", "reqid": reqid})
    else:
        err(f"No such request: {reqid}")
    return ExitCode.FAILURE


def _show_record(inv: Invocation, record: dict[str, Any]) -> None:
    if inv.json:
        out_json({"ok": 1, **record})
    else:
        format_status(record)


def cmd_status(inv: Invocation) -> ExitCode:
    from dispatcher.operations import do_status

    inv.need(1, "status <reqid>")
    reqid = inv.words[0]
    d, caller = inv.d, inv.caller()
    record = dispatch(lambda io: do_status(d, caller, reqid, default_port=inv.default_port,
                                           io=io))  # fmt: skip
    if record is None:
        return _not_found(inv, reqid)
    _show_record(inv, record)
    return ExitCode.OK


def host_failed(h: object) -> bool:
    """For ``wait``: busy, error, expired or a non-zero exit count as failed."""
    if not isinstance(h, dict):
        return True
    s = h.get("status")
    if s in ("busy", "error", "expired"):
        return True
    return s == "done" and exit_of(h.get("exit")) != 0


def cmd_wait(inv: Invocation) -> ExitCode:
    from dispatcher.operations import do_wait

    inv.need(1, "wait <reqid> [--timeout <seconds>]")
    reqid = inv.words[0]
    timeout = inv.ns.timeout if inv.ns.timeout is not None else 300
    interval = float(os.environ.get("CED_WAIT_INTERVAL", "2") or 2)
    d, caller = inv.d, inv.caller()
    record, timed_out = dispatch(lambda io: do_wait(d, caller, reqid, timeout, interval,
                                                    default_port=inv.default_port, io=io))  # fmt: skip
    if record is None:
        return _not_found(inv, reqid)
    _show_record(inv, record)
    if timed_out or not record.get("complete"):
        return ExitCode.PENDING
    hosts = record.get("hosts")
    if isinstance(hosts, dict):
        return ExitCode.FAILURE if any(host_failed(h) for h in hosts.values()) else ExitCode.OK
    results = record.get("results")  # a sync record
    if isinstance(results, list):
        return _all_ok(results)
    return ExitCode.OK
