"""Follower side: watch the generation key, refuse stale generations, apply new ones.

A generation from an epoch older than the newest seen (of generations or of leaders, kept
on disk across restarts: :class:`~dispatcher.ha.sync.state.EpochRecord`) is refused; a
head whose chunks fail their hash check is refused (logged once, the current state kept);
a new one is applied by the :class:`~dispatcher.ha.sync.swapper.Swapper`
(``sync_mode = push``) or only recorded (``shared-fs``). A failed apply is retried with
backoff (0.25 s doubling up to 5 s).

:attr:`Follower.head` is the head last read from the store: ``/ready`` compares it with the
applied generation (:meth:`Follower.in_sync`). A follower that ran the head and reads a
newer one is applying it, not diverged: for :attr:`Follower.LAG_GRACE` s, while nothing
fails, it stays ready (:meth:`Follower.applying`), so an ordinary publish does not take
every follower out of the load balancer at once for the 10-100 ms each takes to apply it.
One that was not in sync when the head came (a restarted instance, one whose apply fails,
an ex-leader ahead of the head it last read) gets no grace.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from agent.common import logfmt
from cluster.backend import KVBackend
from cluster.election import EpochGuard
from cluster.errors import StaleEpoch
from dispatcher.ha.manifest import Generation, ManifestError
from dispatcher.ha.records import Records
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.ha.sync.push import Pushed, PushRefused
from dispatcher.ha.sync.state import AckedMark, AppliedState, EpochRecord, SyncError
from dispatcher.ha.sync.store import GenerationStore
from dispatcher.ha.sync.swapper import Swapper

ev = logfmt.event


class Follower:
    WATCH = 0.25  # longest wait on the generation key before looking again
    RECHECK = 5.0  # read the generation at least this often (besides the watch)
    BOOT_RETRY = 2.0  # without the cluster key: ask a peer for it at most this often
    ACKED_READ = 0.2  # read the acknowledged-generation record this often (kept on disk)
    LAG_GRACE = 3.0  # ready while applying a head read this recently, having run the one before
    PUSH_WAIT = 0.1  # a watched head, while the leader pushes: wait this long for its push

    def __init__(
        self,
        backend: KVBackend,
        state: AppliedState,
        swapper: Swapper,
        health: ClusterHealth,
        leader_guard: EpochGuard,
        records: Records,
        gstore: GenerationStore,
        epochs: EpochRecord,
        *,
        mode: str,
        clock: Callable[[], float],
        acked_mark: AckedMark | None = None,
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
        self.gstore = gstore
        self.epochs = epochs  # the newest epoch seen, on disk
        self.guard = EpochGuard(epochs.saved)  # newest generation epoch accepted
        if epochs.saved > leader_guard.newest:
            leader_guard.check(epochs.saved)
        self.head: Generation | None = None  # the head last read from the store (no files)
        self._behind_since: float | None = None  # it read a head newer than the one it ran
        self.read_once = False  # the store has been read since start
        self.last_error = ""
        self._clock = clock
        self._seen_rev = 0
        self._watch_rev = 0
        self._need_read = True
        self._next_read = 0.0
        self.retry_at: float | None = None
        self._backoff = 0.25
        self._refused_rev = 0
        self._boot_next = 0.0
        self.acked_mark = acked_mark  # the newest acknowledged generation, on this disk
        self._acked_next = 0.0
        # fetch the cluster key from a verified peer when this instance has none
        self.bootstrap: Callable[[bytes], bool] | None = None
        # one apply at a time: the sync thread's (watch) and a push's (API thread)
        self._apply_lock = threading.RLock()
        self._pushed = threading.Condition()  # notified when a push was applied
        # the leader pushes its generations here: until a wait for one was in vain (an
        # older leader, a push that failed), then again from the next push that arrives
        self._expect_push = True
        # (revision, value) of the head the watch delivered last: a push of exactly it is
        # etcd's head without reading the key again
        self._watched: tuple[int, bytes] | None = None

    def step(self) -> None:
        """Read the generation when the watch saw a change (or every ``RECHECK`` s, or when
        a failed apply is due again); apply it if it is new; then watch the key."""
        now = self._clock()
        retry_due = self.retry_at is not None and now >= self.retry_at
        if self._need_read or retry_due or now >= self._next_read:
            # watch from the store's revision of this read (recent, so never compacted away)
            self._watch_rev = self.backend.revision()
            kv = self.backend.get_kv(self.key)
            # (a read that failed is made again at the next step, not RECHECK s later)
            self._need_read = False
            self._next_read = now + self.RECHECK
            self.health.mark_ok()
            self.read_once = True
            if kv is None:
                self.head = None
            elif kv.mod_rev != self._seen_rev or retry_due:
                self._seen_rev = kv.mod_rev
                self.retry_at = None
                self.handle(kv.value, kv.mod_rev)
        self.epochs.save(max(self.guard.newest, self.leader_guard.newest))
        self._keep_acked(now)
        wait = self.WATCH
        if self.retry_at is not None:
            wait = max(0.01, min(wait, self.retry_at - self._clock()))
        start = self._watch_rev + 1 if self._watch_rev else None
        event = self.backend.watch_key(self.key, wait, start)
        if event is None:
            return
        with self._pushed:  # a push of exactly this head need not read it again
            self._watched = (event.mod_rev, event.value) if event.kind == "PUT" else None
        if event.kind == "PUT" and event.mod_rev > self._seen_rev and self._expect_push:
            with self._pushed:  # the leader's push carries the files: no fetch then
                self._expect_push = self._pushed.wait_for(
                    lambda: self._seen_rev >= event.mod_rev, self.PUSH_WAIT
                )
        if event.kind == "PUT" and event.mod_rev > self._seen_rev:
            # the event carries the new head: apply it without reading the key again
            self.health.mark_ok()
            self._watch_rev = self._seen_rev = event.mod_rev
            self.retry_at = None
            self.handle(event.value, event.mod_rev)
        elif event.kind == "PUT":
            # a push applied this head (or a newer one) already: watch on from it (the
            # key's watch stays open: nothing is read again, no change is missed)
            self._watch_rev = max(self._watch_rev, event.mod_rev)
        else:
            self._need_read = True

    def stepped_down(self) -> None:
        """This instance led until now: the head it knows is at best the one it published,
        and a newer leader may have published since (a leader cut off from etcd steps
        down without seeing it). Ready again only once it read the store."""
        self.read_once = False
        self.head = None
        self._behind_since = None
        self._need_read = True

    def _keep_acked(self, now: float) -> None:
        """Keep the newest acknowledged generation on disk: should the record and the head
        be deleted from etcd, this member, once leader, still knows what it must not lose."""
        if self.acked_mark is None or now < self._acked_next:
            return
        if not self.records.signer.available:  # the record cannot be verified yet
            return
        self._acked_next = now + self.ACKED_READ
        from dispatcher.ha.sync import adopt

        self.acked_mark.note(adopt.acked(self.backend, self.records))

    def pushed(self, p: Pushed, leading: Callable[[], bool] = lambda: False) -> int:
        """Apply a generation the leader pushed (:mod:`~dispatcher.ha.sync.push`); the
        generation this instance runs then. Only the head etcd holds now is taken, then
        verified exactly as a watched one; pushed chunks and files only save reading and
        fetching them, under the same checks. :class:`PushRefused` says why not."""
        if self.mode != "push":
            raise PushRefused("this instance does not sync files (sync_mode = shared-fs)")
        with self._apply_lock:
            if leading():
                raise PushRefused("this instance leads")
            with self._pushed:
                watched = self._watched
            if watched != (p.rev, p.head):  # the watch has not shown it (yet): read it
                kv = self.backend.get_kv(self.key)
                self.health.mark_ok()
                if kv is None or kv.value != p.head:
                    raise PushRefused("not the generation head the store holds now")
                watched = (kv.mod_rev, kv.value)
            # else etcd's watch delivered this very head (value and revision) a moment ago:
            # a newer one, should there be one, comes the same way and is applied after it
            head = self.gstore.head(p.head, watched[0])
            if head is None:
                raise PushRefused("the generation head does not verify")
            self.swapper.fetcher.offer(head.number, p.files)
            try:
                # applied.json is written by the sync thread: the leader waits for this answer
                if not self.handle(p.head, watched[0], chunks=p.chunks, save=False):
                    raise PushRefused(self.last_error or "generation refused")
            finally:
                self.swapper.fetcher.offer(0, {})
            with self._pushed:
                self._seen_rev = max(self._seen_rev, watched[0])  # the watch need not apply it
                self._expect_push = True
                self._pushed.notify_all()
            return self.state.number

    def handle(
        self, raw: bytes, rev: int = 0, *, as_leader: bool = False,
        chunks: dict[str, bytes] | None = None, save: bool = True,
    ) -> bool:  # fmt: skip
        """Apply the generation document ``raw``; True when this instance now runs it
        (``chunks``: manifest chunks at hand, checked as read ones are; ``save``: see
        :meth:`AppliedState.record`)."""
        with self._apply_lock:
            return self._handle(raw, rev, as_leader, chunks, save)

    def _handle(
        self, raw: bytes, rev: int, as_leader: bool, chunks: dict[str, bytes] | None,
        save: bool,
    ) -> bool:  # fmt: skip
        g = self._accept(raw, rev, as_leader, chunks)
        if g is None:
            return False
        cur = self.state.applied
        if cur is not None and (cur.number, cur.manifest_sha256) == (g.number, g.manifest_sha256):
            return True
        t0 = self._clock()
        try:
            report: dict[str, Any] = self.swapper.apply(g) if self.mode == "push" else {"copied": 0}
        except (SyncError, ManifestError, OSError) as exc:
            self._retry_later()
            self.last_error = f"{type(exc).__name__}: {exc}"
            ev("sync-failed", logging.WARNING, instance=self.me, generation=g.number,
               error=f"{type(exc).__name__}: {exc}", retry_in=round(self._backoff / 2, 2))  # fmt: skip
            return False
        self._backoff = 0.25
        self.last_error = ""
        took = round((self._clock() - t0) * 1000)
        self.state.record(g, save, took_ms=took, mode=self.mode, **report)
        return True

    def _accept(
        self, raw: bytes, rev: int, as_leader: bool, chunks: dict[str, bytes] | None = None
    ) -> Generation | None:
        """The generation in ``raw`` unless it fails verification (not sealed with the
        cluster key: logged once, counted, ignored; it never moves the epoch guard), its
        chunks fail their hash check (logged once, the current state kept), or (for a
        follower) it is stale."""
        if not self.records.signer.available and self.bootstrap is not None:
            now = self._clock()
            if now >= self._boot_next:  # at most one try every BOOT_RETRY s
                self._boot_next = now + self.BOOT_RETRY
                if not self.bootstrap(raw):
                    self.retry_at = now + self.BOOT_RETRY  # the key may be served soon
        head = self.gstore.head(raw, rev)
        if head is None:
            self.last_error = "refused: the generation record does not verify"
            return None
        if not as_leader:
            self._note_head(head)
        try:
            g = self.gstore.decode(raw, rev, chunks)
        except ManifestError as exc:
            self.last_error = f"refused: {exc}"
            if not as_leader:
                self._retry_later()  # a chunk collected meanwhile: read the head again
            if rev != self._refused_rev:
                self._refused_rev = rev
                ev("sync-refused", logging.WARNING, instance=self.me, reason=f"malformed: {exc}")
            return None
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
            return None
        self.epochs.save(g.epoch)
        return g

    def _retry_later(self) -> None:
        self.retry_at = self._clock() + self._backoff
        self._backoff = min(self._backoff * 2, 5.0)

    def _note_head(self, head: Generation) -> None:
        """Take ``head`` as the head last read; when it ran the one read before (a head,
        not the first read after a start), its lag starts now. Already behind: it started
        then (or, never in sync since the start, there is none)."""
        before = self.head
        if before is not None and (before.number, before.manifest_sha256) != (
            head.number,
            head.manifest_sha256,
        ):
            if self.in_sync():
                self._behind_since = self._clock()
        elif before is None:
            self._behind_since = None
        self.head = head

    def applying(self) -> bool:
        """Behind the head only because it is applying it: it ran the head before, read a
        newer one less than :attr:`LAG_GRACE` s ago, and no apply has failed since."""
        head, cur, since = self.head, self.state.applied, self._behind_since
        if head is None or cur is None or since is None or self.last_error:
            return False
        if self.retry_at is not None or head.number <= cur.number:
            return False
        return self._clock() - since < self.LAG_GRACE

    def in_sync(self) -> bool:
        """The applied generation is the head last read (or nothing is published)."""
        head, cur = self.head, self.state.applied
        if head is None:
            return self.read_once
        return cur is not None and (cur.number, cur.manifest_sha256) == (
            head.number,
            head.manifest_sha256,
        )
