"""Dispatcher run store ``<runs_dir>/<reqid>.json`` (spec 7.3).

Instance-local (not shared state), so records are written with
:func:`agent.common.fsutil.atomic_write_json` (0640), not through a StateWriter. Async status
aggregation is the pure function :func:`aggregate`; the caller does the fetching.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from agent.common import logfmt
from agent.common.errors import CtrlExecError
from agent.common.fsutil import atomic_write_json
from agent.common.records import record

REQID_RE = re.compile(r"[A-Za-z0-9_-]+")
RECORD_MODE = 0o640
DEFAULT_TTL = 86400
PENDING_STATES = frozenset({"accepted", "running"})
_RECORD_FILE = re.compile(r"[A-Za-z0-9_-]+\.json")


class RunStoreError(CtrlExecError):
    """Invalid reqid or record."""


def valid_reqid(reqid: object) -> bool:
    return isinstance(reqid, str) and REQID_RE.fullmatch(reqid) is not None


@record(frozen=True)
class FetchOutcome:
    """What ``GET /result/<reqid>`` on one agent gave."""

    kind: Literal["done", "running", "expired", "error"]
    exit: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str = ""

    @classmethod
    def done(cls, exit: int | None, stdout: str, stderr: str) -> FetchOutcome:
        return cls("done", exit=exit, stdout=stdout, stderr=stderr)

    @classmethod
    def running(cls) -> FetchOutcome:
        return cls("running")

    @classmethod
    def not_found(cls) -> FetchOutcome:
        """The agent answered 404: the result expired or was never there."""
        return cls("expired")

    @classmethod
    def failed(cls, error: str) -> FetchOutcome:
        """Transport error (host down, TLS failure, bad answer)."""
        return cls("error", error=error)


def sync_record(
    reqid: str,
    script: str,
    hosts: list[str],
    results: list[dict[str, Any]],
    submitter: dict[str, str] | None = None,
    now: float | None = None,
    attribution: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Record of a finished synchronous (API) run; ``attribution`` (who asked: the
    operator certificate's ``identity``, or ``unix_user``/``sudo_user`` of a local run)
    adds keys upstream readers ignore."""
    record: dict[str, Any] = {
        "reqid": reqid,
        "script": script,
        "mode": "sync",
        "hosts": list(hosts),
        "results": list(results),
        "completed": int(time.time() if now is None else now),
        "complete": True,
    }
    if submitter:
        record["submitter"] = dict(submitter)
    record.update(_attribution(attribution))
    return record


def async_record(
    reqid: str,
    script: str,
    dispatch_results: Iterable[Mapping[str, Any]],
    submitter: dict[str, str] | None = None,
    now: float | None = None,
    attribution: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Record of an async submission; each result is ``{host, status, error?}``
    (``attribution`` as for :func:`sync_record`)."""
    hosts: dict[str, dict[str, Any]] = {}
    for r in dispatch_results:
        host = r.get("host")
        if host is None:
            continue
        entry: dict[str, Any] = {"status": r.get("status") or "error"}
        if r.get("error") is not None:
            entry["error"] = r["error"]
        hosts[str(host)] = entry
    record: dict[str, Any] = {
        "reqid": reqid,
        "script": script,
        "mode": "async",
        "hosts": hosts,
        "created": int(time.time() if now is None else now),
    }
    if submitter:
        record["submitter"] = dict(submitter)
    record.update(_attribution(attribution))
    return summarise(record)


ATTRIBUTION_KEYS = frozenset({"identity", "unix_user", "sudo_user"})


def _attribution(attribution: Mapping[str, Any] | None) -> dict[str, Any]:
    """Only the attribution keys (never one that would overwrite a record field)."""
    return {k: copy.deepcopy(v) for k, v in (attribution or {}).items() if k in ATTRIBUTION_KEYS}


def pending_hosts(record: Mapping[str, Any]) -> list[str]:
    """Sorted hosts of an async record still ``accepted`` or ``running``."""
    hosts = record.get("hosts")
    if record.get("mode") != "async" or not isinstance(hosts, dict):
        return []
    return sorted(
        h for h, e in hosts.items() if isinstance(e, dict) and e.get("status") in PENDING_STATES
    )


def summarise(record: dict[str, Any]) -> dict[str, Any]:
    """Recompute ``pending`` (sorted) and ``complete`` of an async record in place."""
    record["pending"] = pending_hosts(record)
    record["complete"] = not record["pending"]
    return record


def aggregate(record: Mapping[str, Any], fetched: Mapping[str, FetchOutcome]) -> dict[str, Any]:
    """New record with the per-host outcomes merged in (spec 7.3); input is not changed.

    Only pending hosts are touched; pending hosts missing from ``fetched`` stay as they
    are. A sync record comes back unchanged (as a copy).
    """
    out = copy.deepcopy(dict(record))
    if out.get("mode") != "async":
        return out
    for host in pending_hosts(out):
        outcome = fetched.get(host)
        if outcome is None:
            continue
        entry = out["hosts"][host]
        if outcome.kind == "done":
            out["hosts"][host] = {
                "status": "done",
                "exit": outcome.exit,
                "stdout": outcome.stdout,
                "stderr": outcome.stderr,
            }
        elif outcome.kind in ("running", "expired"):
            entry["status"] = outcome.kind
            entry.pop("fetch_error", None)
        else:
            entry["fetch_error"] = outcome.error or "fetch failed"
    return summarise(out)


class RunStore:
    """Run records of this instance in ``runs_dir``."""

    def __init__(self, runs_dir: str | Path) -> None:
        self.dir = Path(runs_dir)

    def path_of(self, reqid: str) -> Path:
        if not valid_reqid(reqid):
            raise RunStoreError(f"invalid reqid {reqid!r}")
        return self.dir / f"{reqid}.json"

    def save(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` (keyed by its ``reqid``) atomically, 0640."""
        path = self.path_of(record.get("reqid", ""))
        self.dir.mkdir(mode=0o770, parents=True, exist_ok=True)
        atomic_write_json(path, dict(record), RECORD_MODE)

    def load(self, reqid: str) -> dict[str, Any] | None:
        """The record, or None if the reqid is invalid, absent or the file corrupt."""
        if not valid_reqid(reqid):
            return None
        path = self.path_of(reqid)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            logfmt.event("run-store-corrupt", logfmt.WARNING, reqid=reqid, error=exc)
            return None
        return data if isinstance(data, dict) else None

    def purge(self, ttl: float = DEFAULT_TTL, now: float | None = None) -> int:
        """Delete records (and stray temp files) older than ``ttl`` s by mtime; count records."""
        cutoff = (time.time() if now is None else now) - ttl
        try:
            entries = os.listdir(self.dir)
        except FileNotFoundError:
            return 0
        removed = 0
        for name in entries:
            is_record = _RECORD_FILE.fullmatch(name) is not None
            if not is_record and not (name.startswith(".") and name.endswith(".tmp")):
                continue
            path = self.dir / name
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += is_record
        return removed
