"""``ced``'s output: results on stdout, diagnostics on stderr, one JSON document with ``--json``.

Text formats are upstream's (spec 1.2): the run, async-submit, status and ping blocks and
the tables of the registry verbs. JSON uses upstream's ``"ok":1`` / ``"ok":0`` integers.
Standard library only (``ced run`` imports this module).
"""

from __future__ import annotations

import json
import sys
from typing import Any

PROG = "ctrl-exec-dispatcher"


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def err(text: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def out_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")


def table(rows: list[list[str]]) -> list[str]:
    """Left-aligned columns as wide as their widest cell, two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def has_text(value: object) -> bool:
    return isinstance(value, str) and not value.isspace() and value != ""


def exit_of(value: object) -> int:
    """A result's ``exit`` field as an int (-1 when missing or not an integer)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def host_label(r: dict[str, Any]) -> str:
    host = str(r.get("host", "?"))
    if r.get("reported_hostname") is not None:
        host += f" ({r['reported_hostname']})"
    return host


def _stdout_block(text: object) -> None:
    if has_text(text):
        assert isinstance(text, str)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _stderr_block(text: object) -> None:
    if has_text(text):
        out(f"    STDERR: {text}")


def format_run(results: list[dict[str, Any]]) -> None:
    for r in results:
        code = exit_of(r.get("exit"))
        status = "OK" if code == 0 else "FAIL"
        if r.get("status") == "unknown":
            out(f"==> {host_label(r)}  [UNKNOWN  not a registered agent]")
            continue
        if r.get("status") == "skipped":
            out(f"==> {host_label(r)}  [SKIPPED  {r.get('error') or 'not started'}]")
            continue
        out(f"==> {host_label(r)}  [{status}  exit:{code}  {r.get('rtt', '')}  "
            f"req:{r.get('reqid', '')}]")  # fmt: skip
        if r.get("error"):
            out(f"    ERROR: {r['error']}")
        _stdout_block(r.get("stdout"))
        _stderr_block(r.get("stderr"))


def format_async_submit(reqid: str, results: list[dict[str, Any]]) -> None:
    out(f"Submitted async run  req:{reqid}")
    for r in results:
        status = r.get("status") or "error"
        if status == "accepted":
            out(f"==> {host_label(r)}  [accepted  {r.get('rtt', '')}]")
        elif status == "busy":
            out(f"==> {host_label(r)}  [BUSY: {r.get('error') or 'already running'}]")
        else:
            out(f"==> {host_label(r)}  [ERROR: {r.get('error') or 'submit failed'}]")
    out(f"Check progress with: {PROG} status {reqid}")


def _format_host_status(host: str, h: dict[str, Any]) -> None:
    status = str(h.get("status") or "unknown")
    if status == "done":
        out(f"==> {host}  [done  exit:{exit_of(h.get('exit'))}]")
        _stdout_block(h.get("stdout"))
        _stderr_block(h.get("stderr"))
    elif status in ("accepted", "running"):
        out(f"==> {host}  [{status}]")
        if h.get("fetch_error") is not None:
            out(f"    (fetch pending: {h['fetch_error']})")
    else:
        out(f"==> {host}  [{status.upper()}]")
        if h.get("error") is not None:
            out(f"    {h['error']}")


def format_status(record: dict[str, Any]) -> None:
    state = "COMPLETE" if record.get("complete") else "PENDING"
    out(f"Request {record.get('reqid', '?')}  (script: {record.get('script', '?')})  [{state}]")
    if record.get("mode") == "sync" and isinstance(record.get("results"), list):
        format_run(record["results"])
        return
    hosts = record.get("hosts")
    if not isinstance(hosts, dict):
        return
    for host in sorted(hosts):
        _format_host_status(host, hosts[host] if isinstance(hosts[host], dict) else {})


PING_ROW = "{:<30}  {:<8}  {:<8}  {:<28}  {}"


def format_ping_head() -> None:
    out(PING_ROW.format("HOST", "STATUS", "RTT", "CERT EXPIRY", "VERSION"))
    out("-" * 85)


def format_ping_rows(results: list[dict[str, Any]]) -> None:
    for r in results:
        out(PING_ROW.format(host_label(r), str(r.get("status") or "error"),
                            str(r.get("rtt") or "?"), str(r.get("expiry") or "?"),
                            str(r.get("version") or "?")))  # fmt: skip


def format_ping(results: list[dict[str, Any]]) -> None:
    format_ping_head()
    format_ping_rows(results)


def days_left(expiry: object, now: float | None = None) -> str:
    """Whole days until an openssl-format date (``Mon DD HH:MM:SS YYYY GMT``), else ``?``."""
    import calendar
    import time

    if not isinstance(expiry, str) or not expiry:
        return "?"
    try:
        t = calendar.timegm(time.strptime(expiry.strip(), "%b %d %H:%M:%S %Y GMT"))
    except ValueError:
        return "?"
    left = (t - (time.time() if now is None else now)) // 86400
    return str(int(left)) if left >= 0 else "expired"
