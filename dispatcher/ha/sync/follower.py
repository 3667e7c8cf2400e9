"""Follower side: watch the generation key, refuse stale generations, apply new ones.

A generation from an epoch older than the newest seen (of generations or of leaders) is
refused; a new one is applied by the :class:`~dispatcher.ha.sync.swapper.Swapper`
(``sync_mode = push``) or only recorded (``shared-fs``). A failed apply is retried with
backoff (0.25 s doubling up to 5 s).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.common import logfmt
from cluster.backend import KVBackend
from cluster.election import EpochGuard
from cluster.errors import StaleEpoch
from dispatcher.ha.manifest import Generation, ManifestError
from dispatcher.ha.records import Records
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.ha.sync.state import AppliedState, SyncError
from dispatcher.ha.sync.swapper import Swapper

ev = logfmt.event


class Follower:
    WATCH = 0.25  # longest wait on the generation key before looking again
    RECHECK = 5.0  # read the generation at least this often (besides the watch)
    BOOT_RETRY = 2.0  # without the cluster key: ask a peer for it at most this often

    def __init__(
        self,
        backend: KVBackend,
        state: AppliedState,
        swapper: Swapper,
        health: ClusterHealth,
        leader_guard: EpochGuard,
        records: Records,
        *,
        mode: str,
        clock: Callable[[], float],
    ) -> None:
        self.backend = backend
        self.key = backend.keys.generation
        self.state = state
        self.swapper = swapper
        self.health = health
        self.me = state.me
        self.mode = mode
        self.leader_guard = leader_guard  # newest leader epoch seen (the role's)
        self.records = records  # generations are sealed with the cluster key
        self.guard = EpochGuard()  # newest generation epoch accepted
        self._clock = clock
        self._seen_rev = 0
        self._watch_rev = 0
        self._need_read = True
        self._next_read = 0.0
        self.retry_at: float | None = None
        self._backoff = 0.25
        self._refused_rev = 0
        self._boot_next = 0.0
        # fetch the cluster key from a verified peer when this instance has none
        self.bootstrap: Callable[[bytes], bool] | None = None

    def step(self) -> None:
        """Read the generation when the watch saw a change (or every ``RECHECK`` s, or when
        a failed apply is due again); apply it if it is new; then watch the key."""
        now = self._clock()
        retry_due = self.retry_at is not None and now >= self.retry_at
        if self._need_read or retry_due or now >= self._next_read:
            self._need_read = False
            self._next_read = now + self.RECHECK
            # watch from the store's revision of this read (recent, so never compacted away)
            self._watch_rev = self.backend.revision()
            kv = self.backend.get_kv(self.key)
            self.health.mark_ok()
            if kv is None:
                self.state.synced_once = True  # nothing published yet
            elif kv.mod_rev != self._seen_rev or retry_due:
                self._seen_rev = kv.mod_rev
                self.retry_at = None
                self.handle(kv.value, kv.mod_rev)
        wait = self.WATCH
        if self.retry_at is not None:
            wait = max(0.01, min(wait, self.retry_at - self._clock()))
        start = self._watch_rev + 1 if self._watch_rev else None
        if self.backend.watch_key(self.key, wait, start) is not None:
            self._need_read = True

    def handle(self, raw: bytes, rev: int = 0, *, as_leader: bool = False) -> bool:
        """Apply the generation document ``raw``; True when this instance now runs it."""
        g = self._accept(raw, rev, as_leader)
        if g is None:
            return False
        cur = self.state.applied
        if cur is not None and (cur.number, cur.manifest_sha256) == (g.number, g.manifest_sha256):
            self.state.synced_once = True
            return True
        t0 = self._clock()
        try:
            report: dict[str, Any] = self.swapper.apply(g) if self.mode == "push" else {"copied": 0}
        except (SyncError, ManifestError, OSError) as exc:
            self.retry_at = self._clock() + self._backoff
            self._backoff = min(self._backoff * 2, 5.0)
            ev("sync-failed", logging.WARNING, instance=self.me, generation=g.number,
               error=f"{type(exc).__name__}: {exc}", retry_in=round(self._backoff / 2, 2))  # fmt: skip
            return False
        self._backoff = 0.25
        took = round((self._clock() - t0) * 1000)
        self.state.record(g, took_ms=took, mode=self.mode, **report)
        return True

    def _accept(self, raw: bytes, rev: int, as_leader: bool) -> Generation | None:
        """The generation in ``raw`` unless it fails verification (not sealed with the
        cluster key: logged once, counted, ignored; it never moves the epoch guard), is
        malformed or (for a follower) stale."""
        if not self.records.signer.available and self.bootstrap is not None:
            now = self._clock()
            if now >= self._boot_next:  # at most one try every BOOT_RETRY s
                self._boot_next = now + self.BOOT_RETRY
                if not self.bootstrap(raw):
                    self.retry_at = now + self.BOOT_RETRY  # the key may be served soon
        g = self.records.open_generation(self.key, raw, rev)
        if g is None:
            return None
        if as_leader:
            return g
        newest = max(self.guard.newest, self.leader_guard.newest)
        try:
            if g.epoch < newest:
                raise StaleEpoch(g.epoch, newest)
            self.guard.check(g.epoch)
        except StaleEpoch as exc:
            if rev != self._refused_rev:
                self._refused_rev = rev
                ev("sync-refused", logging.WARNING, instance=self.me, generation=g.number,
                   epoch=g.epoch, newest_epoch=exc.newest,
                   reason="generation from an epoch older than the newest seen")  # fmt: skip
            self.state.synced_once = True  # wait for the current leader's generation
            return None
        return g
