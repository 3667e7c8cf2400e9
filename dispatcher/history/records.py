"""The history record of one run, its summary, and the filters of ``ced history``.

A record is a JSON object::

    {"v": 1, "reqid", "mode": "sync"|"async", "via": "cli"|"api", "script",
     "args": [...] | "args_sha256": "<hex>", "user", "user_source": "cert"|"declared"|"unix",
     "targets": [names], "counts": {outcome: n}, "started", "finished" (ISO 8601 UTC),
     "instance", "hosts": {name: {"outcome", "exit"?, "status"?, "error"?,
                                  "stdout", "stderr", "truncated"?}}}

Its **summary** is everything but ``hosts`` (and with at most :data:`SUMMARY_TARGETS`
target names, plus ``targets_total``): small enough for etcd. Stdout and stderr are kept
up to ``history_output_max`` bytes each (``truncated`` names the streams cut).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

VERSION = 1
#: every outcome a host can come to (``skipped``: not started, by a rolling run's budget)
OUTCOMES = ("ok", "failed", "unreachable", "denied", "locked", "unknown", "skipped")
SUMMARY_TARGETS = 256  # target names a summary carries; the full record has them all
SUMMARY_FIELDS = ("v", "reqid", "mode", "via", "script", "args", "args_sha256", "user",
                  "user_source", "targets", "targets_total", "counts", "started", "finished",
                  "instance")  # fmt: skip
_REQID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def valid_reqid(reqid: object) -> bool:
    return isinstance(reqid, str) and _REQID.fullmatch(reqid) is not None


def iso(ts: float) -> str:
    """``2026-12-06T12:34:56.789Z``: as ``datetime.fromtimestamp(ts, UTC)`` renders it (its
    microseconds rounded half to even, then cut to milliseconds), without importing
    ``datetime`` on ``ced run``'s path."""
    whole = int(ts // 1)
    micro = round((ts - whole) * 1e6)
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micro // 1000:03d}Z"


def epoch(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 time (a naive one is UTC); ValueError."""
    value = text.strip()
    fast = _epoch_of_iso(value)
    if fast is not None:
        return fast
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    from datetime import UTC, datetime

    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _epoch_of_iso(v: str) -> float | None:
    """:func:`epoch` of exactly what :func:`iso` writes (``YYYY-MM-DDTHH:MM:SS.mmmZ``),
    computed as ``datetime`` would, without importing it (the key of every saved record);
    ``None`` for anything else (``datetime`` decides)."""
    if len(v) != 24 or v[23] not in "Zz" or v[4] + v[7] + v[10] + v[13] + v[16] + v[19] != "--T::.":
        return None
    digits = v[0:4] + v[5:7] + v[8:10] + v[11:13] + v[14:16] + v[17:19] + v[20:23]
    if not (digits.isascii() and digits.isdigit()):
        return None
    y, mo, d = int(v[0:4]), int(v[5:7]), int(v[8:10])
    h, mi, s, ms = int(v[11:13]), int(v[14:16]), int(v[17:19]), int(v[20:23])
    leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
    if not (y >= 1 and 1 <= mo <= 12 and h < 24 and mi < 60 and s < 60):
        return None
    if not 1 <= d <= _MONTH_DAYS[mo - 1] + (1 if mo == 2 and leap else 0):
        return None
    # days since 1970-01-01 of the civil date (H. Hinnant's days_from_civil)
    yy = y - (mo <= 2)
    era = yy // 400
    yoe = yy - era * 400
    doy = (153 * (mo + (-3 if mo > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    days = era * 146097 + doe - 719468
    # as datetime's timestamp(): timedelta.total_seconds() of the difference
    return ((days * 86400 + h * 3600 + mi * 60 + s) * 10**6 + ms * 1000) / 10**6


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: a duration back from now (``90s``, ``30m``, ``2h``, ``7d``, ``1w``,
    or ``1h30m``) or an ISO 8601 time; the epoch it names. ValueError when neither."""
    raw = text.strip().lower()
    if raw and _DURATION.sub("", raw).strip() == "" and _DURATION.search(raw):
        secs = sum(int(n) * _UNITS[u] for n, u in _DURATION.findall(raw))
        return (time.time() if now is None else now) - secs
    try:
        return epoch(text)
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give a duration (90s, 30m, 2h, 7d, 1w) or an ISO 8601 time"
        ) from None


def key_of(summary: Mapping[str, Any]) -> str:
    """``<started ms, 13 digits>-<reqid>``: sorts by start time (file and etcd key)."""
    ms = int(epoch(str(summary["started"])) * 1000)
    return f"{ms:013d}-{summary['reqid']}"


def reqid_of_key(key: str) -> str:
    return key.split("-", 1)[1] if "-" in key else ""


def _capped(text: object, limit: int) -> tuple[str, bool]:
    s = text if isinstance(text, str) else ("" if text is None else str(text))
    data = s.encode("utf-8", "replace")
    if len(data) <= limit:
        return s, False
    return data[:limit].decode("utf-8", "ignore"), True


def host_entry(res: Mapping[str, Any], outcome: str, output_max: int) -> dict[str, Any]:
    """One host's part of a record: its outcome, exit or status, error, capped output."""
    entry: dict[str, Any] = {"outcome": outcome if outcome in OUTCOMES else "failed"}
    for k in ("exit", "status", "error", "rtt"):
        if res.get(k) is not None:
            entry[k] = res[k]
    cut = []
    for stream in ("stdout", "stderr"):
        entry[stream], was_cut = _capped(res.get(stream), output_max)
        if was_cut:
            cut.append(stream)
    if cut:
        entry["truncated"] = cut
    return entry


def who(kind: str, username: str, identity: str, sudo_user: str) -> tuple[str, str]:
    """``(user, user_source)``: the operator certificate's CN for the API (else the body's
    self-declared username, marked ``declared``); for ``ced`` the Unix user, or the one
    ``sudo`` ran it for."""
    if kind == "cli":
        return (sudo_user or identity or "(unknown)"), "unix"
    if identity:
        return identity, "cert"
    return (username or "(none)"), "declared"


def build(
    *,
    reqid: str,
    mode: str,
    via: str,
    script: str,
    args: Sequence[str],
    args_policy: str,
    user: tuple[str, str],
    results: Sequence[Mapping[str, Any]],
    outcomes: Mapping[str, str],
    started: float,
    finished: float,
    instance: str,
    output_max: int,
    extra: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The record of one finished run (or async submission); ``outcomes`` maps each
    host to its outcome (a host missing there counts as ``failed``)."""
    hosts: dict[str, dict[str, Any]] = {}
    for res in results:
        name = str(res.get("host", ""))
        if not name:
            continue
        hosts[name] = host_entry(res, outcomes.get(name, "failed"), output_max)
    counts = dict.fromkeys(OUTCOMES, 0)
    for entry in hosts.values():
        counts[entry["outcome"]] += 1
    rec: dict[str, Any] = {"v": VERSION, "reqid": reqid, "mode": mode, "via": via,
                           "script": script}  # fmt: skip
    if args_policy == "hash":
        import hashlib

        rec["args_sha256"] = hashlib.sha256(json.dumps(list(args)).encode()).hexdigest()
    else:
        rec["args"] = list(args)
    rec.update({"user": user[0], "user_source": user[1], **dict(extra or {}),
                "targets": list(hosts), "counts": counts, "started": iso(started),
                "finished": iso(finished), "instance": instance, "hosts": hosts})  # fmt: skip
    return rec


def summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record without per-host output, at most :data:`SUMMARY_TARGETS` names."""
    out = {k: record[k] for k in SUMMARY_FIELDS if k in record}
    targets = list(record.get("targets") or [])
    if len(targets) > SUMMARY_TARGETS:
        out["targets"] = targets[:SUMMARY_TARGETS]
        out["targets_total"] = len(targets)
    return out


def well_formed(summary: object) -> bool:
    """A summary with the fields ``ced history`` relies on, of the right types."""
    if not isinstance(summary, dict) or not valid_reqid(summary.get("reqid")):
        return False
    if not isinstance(summary.get("script"), str) or not isinstance(summary.get("user"), str):
        return False
    if not isinstance(summary.get("targets"), list) or not isinstance(summary.get("counts"), dict):
        return False
    try:
        key_of(summary)
        epoch(str(summary.get("finished")))
    except (ValueError, KeyError, TypeError, OverflowError):
        return False
    return isinstance(summary.get("instance"), str)


class Filter:
    """``--host``, ``--script``, ``--since`` (epoch), ``--user``; None matches anything."""

    def __init__(self, host: str | None = None, script: str | None = None,
                 since: float | None = None, user: str | None = None) -> None:  # fmt: skip
        self.host = host
        self.script = script
        self.since = since
        self.user = user

    def since_key(self) -> str:
        """Keys below this one started before ``since``."""
        return f"{int((self.since or 0) * 1000):013d}"

    def matches(self, s: Mapping[str, Any], key: str | None = None) -> bool:
        if self.since is not None and (key or key_of(s)) < self.since_key():
            return False
        if self.script is not None and s.get("script") != self.script:
            return False
        if self.user is not None and s.get("user") != self.user:
            return False
        return self.host is None or self.host in (s.get("targets") or ())
