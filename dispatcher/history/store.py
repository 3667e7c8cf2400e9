"""This instance's job history: full records in ``<state_dir>/history``.

Layout (every file written atomically, 0640, by the process that ran the job: the API
daemon, or ``ced`` acting as the service user)::

    runs/<reqid>.json        the full record (per-host output capped)
    index/<key>.json         its summary; <key> = <started ms, 13 digits>-<reqid>
    outbox/<key>             "not yet in etcd": the API daemon publishes and removes it
    refused.json             runs refused by every agent (made-up script names): counted

Writes are atomic (a temporary file renamed over the name: readers see the whole record
or none) but not flushed to disk one by one: ``ced run`` must stay fast, and a record
lost to a power cut costs history, never state; an unreadable file is skipped.

A run is listed once its index entry exists (written after the record). Listing reads
the index names (one ``listdir``, sorted) newest first and opens only the summaries it
needs. Retention (:meth:`HistoryStore.retain`) removes names past ``history_max_runs``
or older than ``history_max_age``, oldest first, reading only the index names (never more
than the kept runs plus a few). It runs after one write in :data:`RETAIN_EVERY` (chosen at
random, so concurrent ``ced`` processes need no shared counter: the store overshoots its
limit by about that many runs, never by more than a few times it in practice), after each
round in which the API daemon published new runs, and whenever a listing sees too many.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from agent.common import logfmt
from dispatcher.history import records as hr

MODE = 0o640
DIR_MODE = 0o770
RETAIN_EVERY = 32


def write_json(path: Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON (0640) by rename, without fsync."""
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), MODE)  # whatever the umask
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class HistoryStore:
    def __init__(self, state_dir: str | Path, *, max_runs: int = 10000,
                 max_age: float = 30 * 86400, publish: bool = False,
                 retain_every: int = RETAIN_EVERY) -> None:  # fmt: skip
        self.root = Path(state_dir) / "history"
        self.runs = self.root / "runs"
        self.index = self.root / "index"
        self.outbox = self.root / "outbox"
        self.max_runs = max_runs
        self.max_age = max_age
        self.publish = publish  # mark new runs for the daemon to publish (etcd configured)
        self.retain_every = retain_every

    # -- writing --------------------------------------------------------------------------

    def save(self, record: Mapping[str, Any], now: float | None = None) -> str:
        """Write the record, then its summary (and outbox mark); returns its key."""
        reqid = record.get("reqid")
        if not hr.valid_reqid(reqid):
            raise ValueError(f"invalid reqid {reqid!r}")
        summary = hr.summary(record)
        key = hr.key_of(summary)
        dirs = (self.runs, self.index, self.outbox) if self.publish else (self.runs, self.index)
        for d in dirs:
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        write_json(self.runs / f"{reqid}.json", dict(record))
        write_json(self.index / f"{key}.json", summary)
        if self.publish:
            fd = os.open(self.outbox / key, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, MODE)
            os.close(fd)
        if self.retain_every <= 1 or _one_in(self.retain_every):
            self.retain(now)
        return key

    def count_refused(self, script: str, now: float | None = None) -> int:
        """Count one run every agent refused (script not permitted) instead of keeping a
        record of it; returns the count so far."""
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        path = self.root / "refused.json"
        fd = os.open(self.root / ".refused.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            doc = self.refused()
            doc["count"] = int(doc.get("count", 0)) + 1
            doc["last"] = hr.iso(time.time() if now is None else now)
            doc["last_script"] = script[:200]
            write_json(path, doc)
            return int(doc["count"])
        finally:
            os.close(fd)

    def refused(self) -> dict[str, Any]:
        try:
            doc = json.loads((self.root / "refused.json").read_bytes())
        except (OSError, ValueError):
            return {"count": 0}
        return doc if isinstance(doc, dict) else {"count": 0}

    # -- retention ------------------------------------------------------------------------

    def _keys(self) -> list[str]:
        """Every index key, oldest first."""
        try:
            names = os.listdir(self.index)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith("."))

    def retain(self, now: float | None = None) -> int:
        """Remove runs past ``max_runs`` or older than ``max_age``; how many went."""
        keys = self._keys()
        cutoff = hr.Filter(since=(time.time() if now is None else now) - self.max_age)
        excess = max(0, len(keys) - self.max_runs)
        gone = 0
        for i, key in enumerate(keys):
            if i >= excess and key >= cutoff.since_key():
                break
            self._remove(key)
            gone += 1
        return gone

    def _remove(self, key: str) -> None:
        for path in (self.index / f"{key}.json", self.outbox / key,
                     self.runs / f"{hr.reqid_of_key(key)}.json"):  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- reading --------------------------------------------------------------------------

    def load(self, reqid: str) -> dict[str, Any] | None:
        """The full record, or None (unknown, invalid reqid, or unreadable)."""
        if not hr.valid_reqid(reqid):
            return None
        try:
            data = json.loads((self.runs / f"{reqid}.json").read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logfmt.event("history-corrupt", logfmt.WARNING, reqid=reqid, error=exc)
            return None
        return data if isinstance(data, dict) else None

    def summary(self, key: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.index / f"{key}.json").read_bytes())
        except (OSError, ValueError):
            return None
        return data if hr.well_formed(data) else None

    def entries(self, flt: hr.Filter | None = None,
                before: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:  # fmt: skip
        """``(key, summary)`` newest first, matching ``flt``, keys below ``before``."""
        flt = flt or hr.Filter()
        low = flt.since_key() if flt.since is not None else ""
        keys = self._keys()
        if len(keys) > self.max_runs:
            self.retain()
            keys = keys[len(keys) - self.max_runs :]
        for key in reversed(keys):
            if before is not None and key >= before:
                continue
            if key < low:
                return
            s = self.summary(key)
            if s is None or not self._matches(flt, s, key):
                continue
            yield key, s

    def _matches(self, flt: hr.Filter, s: dict[str, Any], key: str) -> bool:
        if flt.matches(s, key):
            return True
        if flt.host is None or "targets_total" not in s:
            return False
        full = self.load(str(s["reqid"]))  # the summary lists only the first targets
        bare = hr.Filter(flt.host, flt.script, flt.since, flt.user)
        return full is not None and bare.matches({**s, "targets": full.get("targets")}, key)

    def pending(self) -> list[str]:
        """Keys still to publish, oldest first."""
        try:
            return sorted(n for n in os.listdir(self.outbox) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def published(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.outbox / key).unlink()


def for_config(cfg: Any) -> HistoryStore:
    """The store of a :class:`~dispatcher.config.DispatcherConfig`."""
    return HistoryStore(cfg.state_dir, max_runs=cfg.history_max_runs,
                        max_age=cfg.history_max_age, publish=bool(cfg.etcd_endpoints))  # fmt: skip


def _one_in(n: int) -> bool:
    """True once in ``n`` calls on average (``os.urandom``: no ``random`` import)."""
    return int.from_bytes(os.urandom(4), "big") % n == 0
