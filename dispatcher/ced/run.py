"""``ced run``, ``ping``, ``status`` and ``wait``: the shared operations over the blocking client.

The operations are the API daemon's (:mod:`dispatcher.operations`), run by
:func:`~dispatcher.ced.invocation.dispatch`: no asyncio, no ``cryptography`` (unless an
agent certificate is due for renewal), no ``dataclasses`` and no ``logging`` module, for
a fast start (``bench/ced_bench.py``, ``tests/unit/dispatcher/test_cli_imports.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from dispatcher.ced.invocation import Invocation, dispatch
from dispatcher.ced.live import Live, progress_wanted, recap, show_run
from dispatcher.ced.output import (
    err,
    exit_of,
    format_async_submit,
    format_ping,
    format_ping_head,
    format_ping_rows,
    format_run,
    format_status,
    out,
    out_json,
)
from dispatcher.errors import ExitCode, UsageError
from dispatcher.rolling import Rolling
from dispatcher.targets import Selection, parse_tags, read_stdin_names

T = TypeVar("T")


def _all_ok(results: list[dict[str, Any]]) -> ExitCode:
    return ExitCode.OK if all(exit_of(r.get("exit")) == 0 for r in results) else ExitCode.FAILURE


def selection(inv: Invocation, refs: list[str]) -> Selection:
    """The targets the options and ``refs`` ask for (``-`` reads names from stdin)."""
    if "-" in refs:
        given = read_stdin_names(sys.stdin.read())
        refs = [n for r in refs for n in (given if r == "-" else [r])]
    try:
        tags = parse_tags(inv.ns.tags) if inv.ns.tags else ()
    except ValueError as exc:
        raise UsageError(f"--tags: {exc}") from None
    return Selection(tuple(refs), tags, bool(inv.ns.all), bool(inv.ns.strict))


def rolling(inv: Invocation, verb: str) -> Rolling | None:
    """``--batch``, ``--max-fail`` and ``--fail-fast`` as a policy (None: not rolling)."""
    ns = inv.ns
    if verb == "ping" and (ns.max_fail is not None or ns.fail_fast):
        raise UsageError("--max-fail/--fail-fast are for run (ping takes --batch)")
    try:
        policy = Rolling.parse(ns.batch, ns.max_fail, bool(ns.fail_fast))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if policy is not None and getattr(ns, "async_", False):
        raise UsageError("--batch/--max-fail/--fail-fast need a synchronous run (not --async)")
    return policy


def _limited(fn: Callable[[], T]) -> T:
    """``fn()``, with ``max_hosts`` refusals (ValueError) as usage errors (exit 2)."""
    try:
        return fn()
    except ValueError as exc:
        if str(exc).startswith("too many hosts"):
            raise UsageError(str(exc)) from None
        raise


def _split_run_words(inv: Invocation) -> tuple[list[str], str]:
    by_option = bool(inv.ns.all or inv.ns.tags)
    usage = "run <host>[:<port>]|<glob>|- [<host>...] <script> [-- <arg>...]  (or --tags/--all)"
    inv.need(1 if by_option else 2, usage)
    return inv.words[:-1], inv.words[-1]


def _dry_run(inv: Invocation, sel: Selection, policy: Rolling | None = None) -> ExitCode:
    from dispatcher.targets import select

    d = inv.d
    got = _limited(lambda: select(d.registry, sel, inv.default_port, d.cfg.max_hosts))
    sizes = policy.waves(len(got.targets)) if policy is not None and policy.batch else []
    waves = [n for n, size in enumerate(sizes, 1) for _ in range(size)]
    if inv.json:
        targets = [{"host": t.name, "address": t.address, "port": t.port,
                    **({"wave": waves[i]} if waves else {})}
                   for i, t in enumerate(got.targets)]  # fmt: skip
        out_json({"ok": 1, "dry_run": True, "unknown": got.unknown, "targets": targets})
    else:
        for i, t in enumerate(got.targets):
            out(f"{t.name}  {t.address}:{t.port}" + (f"  wave {waves[i]}" if waves else ""))
        for ref in got.unknown:
            out(f"{ref}  UNKNOWN (not a registered agent)")
        in_waves = f" in {len(sizes)} waves" if sizes else ""
        err(f"{len(got.targets)} target(s){in_waves}, {len(got.unknown)} unknown "
            "(dry run: nothing ran)")  # fmt: skip
    return ExitCode.FAILURE if got.unknown else ExitCode.OK


def _live(
    inv: Invocation, show: Callable[[dict[str, Any]], None] | None, files: bool = True
) -> Live:
    machine = inv.json or inv.ns.stream
    progress = None if machine or not progress_wanted(sys.stderr) else sys.stderr
    by_host = inv.ns.order == "host"
    return Live(show=None if machine or by_host else show, ndjson=bool(inv.ns.stream),
                progress=progress, outdir=inv.ns.output_dir if files else None)  # fmt: skip


def _running(live: Live, fn: Callable[[], T]) -> T:
    """``fn()`` (the operation) with ``max_hosts`` as a usage error; when it fails, the
    progress line is ended before the error is reported."""
    try:
        return _limited(fn)
    except BaseException:
        live.close(quiet=True)
        raise


def _rolled(res: dict[str, Any]) -> dict[str, Any]:
    return {"rolling": res["rolling"]} if "rolling" in res else {}


def _finish(inv: Invocation, live: Live, rolled: dict[str, Any] | None = None) -> None:
    live.close()
    if not inv.json and not inv.ns.stream:
        for line in recap(live.done, live.counts, live.elapsed(), rolled):
            err(line)


def cmd_run(inv: Invocation) -> ExitCode:
    from dispatcher.operations import do_run

    refs, script = _split_run_words(inv)
    sel = selection(inv, refs)
    policy = rolling(inv, "run")
    if inv.ns.dry_run:
        return _dry_run(inv, sel, policy)
    d, caller = inv.d, inv.caller()
    live = _live(inv, show_run)
    if inv.ns.async_:
        live = Live()  # the submission is quick: printed once, below
    res = _running(live, lambda: dispatch(lambda io: do_run(
        d, caller, refs, script, inv.script_args, async_=inv.ns.async_,
        default_port=inv.default_port, io=io, select_=sel, on_result=live,
        on_targets=live.expect, rolling=policy, on_wave=live.wave)))  # fmt: skip
    results: list[dict[str, Any]] = res["results"]
    counts: dict[str, int] = res["counts"]
    if inv.ns.async_:
        live.close()
        if inv.json:
            out_json({"ok": 1, "reqid": res["reqid"], "results": results, "counts": counts})
        else:
            format_async_submit(res["reqid"], results)
        accepted = any(r.get("status") == "accepted" for r in results)
        return ExitCode.OK if accepted else ExitCode.FAILURE
    if inv.json:
        out_json({"ok": 1, "results": results, "counts": counts, **_rolled(res)})
    elif not inv.ns.stream and live.show is None:
        format_run(results)  # --order host: today's order, once every host has finished
    _finish(inv, live, res.get("rolling"))
    return ExitCode.OK if counts["ok"] == len(results) else ExitCode.FAILURE


def cmd_ping(inv: Invocation) -> ExitCode:
    from dispatcher.operations import do_ping

    by_option = bool(inv.ns.all or inv.ns.tags)
    inv.need(0 if by_option else 1, "ping <host>[:<port>]|<glob>|- [<host>...]  (or --tags/--all)")
    sel = selection(inv, inv.words)
    policy = rolling(inv, "ping")
    if inv.ns.dry_run:
        return _dry_run(inv, sel, policy)
    if inv.ns.output_dir:
        raise UsageError("-o/--output-dir is for run (ping has no output to save)")
    d, caller = inv.d, inv.caller()
    headed: list[bool] = []

    def row(r: dict[str, Any]) -> None:  # under the Live lock: the header once, first
        if not headed:
            headed.append(True)
            format_ping_head()
        format_ping_rows([r])

    live = _live(inv, row, files=False)
    res = _running(live, lambda: dispatch(lambda io: do_ping(
        d, caller, inv.words, renew=True, io=io, default_port=inv.default_port, select_=sel,
        on_result=live, on_targets=live.expect, rolling=policy, on_wave=live.wave)))  # fmt: skip
    counts: dict[str, int] = res["counts"]
    if inv.json:
        out_json({"ok": 1, "results": res["results"], "counts": counts, **_rolled(res)})
    elif not inv.ns.stream and live.show is None:
        format_ping(res["results"])  # --order host
    _finish(inv, live, res.get("rolling"))
    return ExitCode.FAILURE if counts["unknown"] else ExitCode.OK


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
