"""Async run records every instance can answer for: metadata in the cluster store.

:class:`ClusterRunStore` is the instance's :class:`~dispatcher.runstore.RunStore` (local
files stay the first source and the fallback) that also publishes the **metadata** of
each new async run under ``/<cluster>/runs/<reqid>``: reqid, script, mode, hosts with
their accept status (and submission error), created, submitter, pending, complete. Never
stdout or stderr: those stay with the agents, which keep results for any dispatcher that
presents the shared identity, so whichever instance is asked fetches ``GET /result`` and
aggregates as the submitting instance would.

Keys are bound to a shared lease granted for a day plus an hour and replaced every hour,
so a record lives between 24 and 25 hours (the local store's purge age is 24 hours).
Publishing or reading never fails a run: while the store is unreachable the local store
alone answers (an async run submitted elsewhere is then unknown here).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.common import logfmt
from cluster.backend import KVBackend
from cluster.errors import BackendUnavailable
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.runstore import DEFAULT_TTL, RunStore, valid_reqid

LEASE_SLACK = 3600  # a lease is reused for this long, so records live TTL .. TTL + slack
_META_KEYS = ("reqid", "script", "mode", "created", "submitter", "pending", "complete")
_MAX_REMEMBERED = 10_000


def metadata(record: Mapping[str, Any]) -> dict[str, Any]:
    """The shareable part of an async record (no output of any host)."""
    meta = {k: record[k] for k in _META_KEYS if k in record}
    hosts: dict[str, Any] = {}
    for host, entry in (record.get("hosts") or {}).items():
        if not isinstance(entry, Mapping):
            continue
        small = {"status": entry.get("status") or "error"}
        if entry.get("error") is not None:
            small["error"] = entry["error"]
        hosts[str(host)] = small
    meta["hosts"] = hosts
    return meta


class ClusterRunStore(RunStore):
    """Local run records plus async-run metadata shared through the cluster store."""

    def __init__(
        self,
        runs_dir: str | Path,
        backend: KVBackend,
        health: ClusterHealth,
        *,
        ttl: int = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(runs_dir)
        self.backend = backend
        self.health = health
        self.ttl = ttl
        self._clock = clock
        self._lease: tuple[int, float] | None = None  # (lease id, monotonic grant time)
        self._from_cluster: set[str] = set()
        self._lock = threading.Lock()

    def _record_lease(self) -> int:
        now = self._clock()
        with self._lock:
            lease = self._lease
        if lease is not None and now - lease[1] < LEASE_SLACK:
            return lease[0]
        granted = self.backend.lease_grant(self.ttl + LEASE_SLACK)
        with self._lock:
            self._lease = (granted.id, now)
        return granted.id

    def publish(self, record: Mapping[str, Any]) -> bool:
        """Put the record's metadata in the store; False (logged) when that failed."""
        reqid = str(record.get("reqid", ""))
        if not self.health.ok:
            logfmt.event("run-publish", logging.WARNING, reqid=reqid, result="skip",
                         reason=f"cluster unavailable: {self.health.error}")  # fmt: skip
            return False
        doc = json.dumps(metadata(record), sort_keys=True, separators=(",", ":"))
        try:
            lease = self._record_lease()
            try:
                self.backend.put_value(self.backend.keys.run(reqid), doc, lease)
            except BackendUnavailable:
                with self._lock:
                    self._lease = None  # perhaps gone with an etcd restore; grant anew
                lease = self._record_lease()
                self.backend.put_value(self.backend.keys.run(reqid), doc, lease)
        except BackendUnavailable as exc:
            self.health.mark_failed(exc)
            logfmt.event("run-publish", logging.WARNING, reqid=reqid, result="error",
                         error=exc)  # fmt: skip
            return False
        return True

    def save(self, record: Mapping[str, Any]) -> None:
        reqid = str(record.get("reqid", ""))
        new = not self.path_of(reqid).exists()
        super().save(record)
        with self._lock:
            known = reqid in self._from_cluster
        if new and not known and record.get("mode") == "async":
            self.publish(record)

    def load(self, reqid: str) -> dict[str, Any] | None:
        rec = super().load(reqid)
        if rec is not None or not valid_reqid(reqid) or not self.health.ok:
            return rec
        try:
            raw = self.backend.get_value(self.backend.keys.run(reqid))
        except BackendUnavailable as exc:
            self.health.mark_failed(exc)
            return None
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            logfmt.event("run-store-corrupt", logging.WARNING, reqid=reqid, source="cluster")
            return None
        if not isinstance(doc, dict) or doc.get("reqid") != reqid:
            return None
        with self._lock:
            if len(self._from_cluster) >= _MAX_REMEMBERED:
                self._from_cluster.clear()
            self._from_cluster.add(reqid)
        return doc
