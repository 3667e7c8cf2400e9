"""``ced history`` and ``ced show``: the job history of every instance.

``history [--host H] [--script S] [--since DUR|ISO] [--user U] [--limit N] [--json]``
lists runs newest first (this instance's store, plus every instance's summaries in etcd);
``show REQID [--json]`` prints one run with each host's stdout, stderr and exit, fetched
from the instance that ran it when that is another one (exit 1 with the reason when it
cannot be reached).
"""

from __future__ import annotations

from typing import Any

from dispatcher.ced.invocation import Invocation
from dispatcher.ced.output import err, out, out_json, table
from dispatcher.errors import ExitCode, UsageError
from dispatcher.history import records as hr

DEFAULT_LIMIT = 20
COUNT_ORDER = ("ok", "failed", "unreachable", "denied", "locked", "unknown", "skipped")


def filter_of(inv: Invocation) -> hr.Filter:
    since = None
    if inv.ns.since:
        try:
            since = hr.parse_since(inv.ns.since)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return hr.Filter(host=inv.ns.host, script=inv.ns.script, since=since, user=inv.ns.user)


def counts_text(counts: Any) -> str:
    if not isinstance(counts, dict):
        return "?"
    parts = [f"{k} {counts[k]}" for k in COUNT_ORDER if counts.get(k)]
    return ", ".join(parts) or "no hosts"


def cmd_history(inv: Invocation) -> ExitCode:
    from dispatcher.history.view import listing

    if inv.words:
        raise UsageError("Usage: history [--host H] [--script S] [--since DUR|ISO] "
                         "[--user U] [--limit N] [--json]")  # fmt: skip
    limit = inv.ns.limit if inv.ns.limit is not None else DEFAULT_LIMIT
    if not 1 <= limit <= 1000:
        raise UsageError("--limit must be 1..1000")
    page = listing(inv.d.cfg, filter_of(inv), limit)
    for w in page.warnings:
        err(f"Warning: {w}")
    if inv.json:
        out_json(page.runs)
        return ExitCode.OK
    rows = [["STARTED", "REQID", "USER", "SCRIPT", "HOSTS", "OUTCOME", "INSTANCE"]]
    for s in page.runs:
        total = s.get("targets_total") or len(s.get("targets") or [])
        rows.append([str(s.get("started", "?"))[:19].replace("T", " "), str(s["reqid"]),
                     str(s.get("user")), str(s.get("script")), str(total),
                     counts_text(s.get("counts")), str(s.get("instance"))])  # fmt: skip
    if len(rows) == 1:
        err("No runs recorded (matching these filters).")
        return ExitCode.OK
    for line in table(rows):
        out(line)
    return ExitCode.OK


def _print_record(rec: dict[str, Any]) -> None:
    args = rec.get("args")
    shown = " ".join(args) if isinstance(args, list) else f"sha256:{rec.get('args_sha256', '?')}"
    out(f"Run {rec.get('reqid')}  script {rec.get('script')}  args {shown or '(none)'}")
    out(f"  by {rec.get('user')} ({rec.get('user_source')}, {rec.get('via')}) on instance "
        f"{rec.get('instance')}, {rec.get('mode')}")  # fmt: skip
    out(f"  started {rec.get('started')}  finished {rec.get('finished')}")
    out(f"  {counts_text(rec.get('counts'))}")
    hosts = rec.get("hosts")
    for name, h in hosts.items() if isinstance(hosts, dict) else []:
        if not isinstance(h, dict):
            continue
        code = h.get("exit", h.get("status", "?"))
        out(f"\n[{name}] {h.get('outcome')} (exit {code})"
            + (f": {h['error']}" if h.get("error") else ""))  # fmt: skip
        for stream in ("stdout", "stderr"):
            text = h.get(stream)
            if isinstance(text, str) and text:
                out(f"--- {stream}" + (" (truncated)" if stream in h.get("truncated", ())
                                         else ""))  # fmt: skip
                out(text.rstrip("\n"))


def cmd_show(inv: Invocation) -> ExitCode:
    from cluster.errors import BackendUnavailable
    from dispatcher.history.owner import OwnerUnreachable, RecordGone
    from dispatcher.history.view import show

    inv.need(1, "show <reqid> [--json]")
    reqid = inv.words[0]
    if not hr.valid_reqid(reqid):
        raise UsageError(f"invalid reqid {reqid!r}")
    try:
        rec = show(inv.d.cfg, reqid)
    except (LookupError, RecordGone) as exc:
        return _failed(inv, reqid, "not found", str(exc))
    except OwnerUnreachable as exc:
        return _failed(inv, reqid, "owner unreachable", str(exc))
    except BackendUnavailable as exc:
        return _failed(inv, reqid, "cluster unavailable",
                       f"etcd unreachable ({exc}): runs of other instances cannot be found")  # fmt: skip
    if inv.json:
        out_json(rec)
    else:
        _print_record(rec)
    return ExitCode.OK


def _failed(inv: Invocation, reqid: str, error: str, detail: str) -> ExitCode:
    if inv.json:
        out_json({"ok": 0, "error": error, "detail": detail, "reqid": reqid})
    err(f"Error: {detail}")
    return ExitCode.FAILURE
