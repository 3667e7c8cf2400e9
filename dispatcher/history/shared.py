"""Job summaries in etcd: every instance's runs, visible from every instance.

Each run's summary (:func:`dispatcher.history.records.summary`: no output, at most 256
target names, a few hundred bytes) is put under ``/<cluster>/jobs/<key>`` sealed with the
cluster key (kind ``job``: the MAC binds the key, so a summary cannot be moved to
another key either). Readers open every summary and drop what fails (logged once per key,
counted as a rejected record): a forged summary written straight into etcd is never
listed, and ``ced show`` never follows it to a made-up owner.

Only the API daemon writes here (:class:`Publisher`, called from its monitor loop): it
publishes what its instance's store marked in ``outbox/``, including the runs ``ced``
made on the same host, so ``ced run`` never talks to etcd for its history. Retention:
keys are bound to a lease of ``history_max_age`` plus an hour, granted anew every hour
(a summary lives between the age limit and an hour more), and every
:data:`TRIM_EVERY` publications the publisher trims the prefix to ``history_max_runs``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from agent.common import logfmt
from cluster.backend import KVBackend
from cluster.errors import BackendUnavailable
from dispatcher.ha.records import Records
from dispatcher.history import records as hr
from dispatcher.history.store import HistoryStore

KIND = "job"
LEASE_SLACK = 3600
TRIM_EVERY = 100
BATCH = 200  # summaries published per monitor round at most


def prefix(backend: KVBackend) -> str:
    return f"{backend.keys.prefix}jobs/"


def read(backend: KVBackend, records: Records) -> list[tuple[str, dict[str, Any]]]:
    """Every verified, well-formed summary as ``(key, summary)``, newest first."""
    out: list[tuple[str, dict[str, Any]]] = []
    pre = prefix(backend)
    for kv in backend.get_prefix(pre):
        body = records.open_dict(KIND, kv.key, kv.value)
        if body is None:
            continue
        key = kv.key[len(pre) :]
        if not hr.well_formed(body) or hr.key_of(body) != key:
            continue
        out.append((key, body))
    out.sort(key=lambda e: e[0], reverse=True)
    return out


def find(backend: KVBackend, records: Records, reqid: str) -> dict[str, Any] | None:
    """The verified summary of ``reqid`` (None when no instance published it)."""
    if not hr.valid_reqid(reqid):
        return None
    for key, s in read(backend, records):
        if hr.reqid_of_key(key) == reqid:
            return s
    return None


class Publisher:
    """Publishes this instance's new summaries (one monitor round: :meth:`step`)."""

    def __init__(self, store: HistoryStore, backend: KVBackend, records: Records, *,
                 max_age: int, max_runs: int,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.store = store
        self.backend = backend
        self.records = records
        self.max_age = max_age
        self.max_runs = max_runs
        self._clock = clock
        self._lease: tuple[int, float] | None = None
        self._since_trim = 0

    def _lease_id(self) -> int:
        now = self._clock()
        if self._lease is not None and now - self._lease[1] < LEASE_SLACK:
            return self._lease[0]
        granted = self.backend.lease_grant(self.max_age + LEASE_SLACK)
        self._lease = (granted.id, now)
        return granted.id

    def step(self) -> int:
        """Publish up to :data:`BATCH` pending summaries; how many went out. Store errors
        propagate (:class:`BackendUnavailable`): the marks stay for the next round."""
        if self.records.problem is not None:
            return 0  # no cluster key yet: nothing could verify them
        done = 0
        for key in self.store.pending()[:BATCH]:
            s = self.store.summary(key)
            if s is None or hr.key_of(s) != key:
                self.store.published(key)  # retention removed it, or it is unreadable
                continue
            full = f"{prefix(self.backend)}{key}"
            sealed = self.records.seal(KIND, full, s)
            try:
                self.backend.put_value(full, sealed, self._lease_id())
            except BackendUnavailable:
                self._lease = None  # perhaps gone (an etcd restore): grant a new one once
                self.backend.put_value(full, sealed, self._lease_id())
            self.store.published(key)
            done += 1
        if done:
            self.store.retain()
        self._since_trim += done
        if self._since_trim >= TRIM_EVERY:
            self._since_trim = 0
            self.trim()
        return done

    def trim(self) -> int:
        """Delete the oldest summaries past ``max_runs`` (cluster-wide); how many went."""
        keys = [kv.key for kv in self.backend.get_prefix(prefix(self.backend))]
        excess = sorted(keys)[: max(0, len(keys) - self.max_runs)]
        for key in excess:
            self.backend.delete_value(key)
        if excess:
            logfmt.event("history-trim", logging.INFO, removed=len(excess), kept=self.max_runs)
        return len(excess)
