"""Leader election on a :class:`~cluster.backend.Backend`, and fenced leader-only effects.

:class:`Elector` runs in a **thread**, not an asyncio task: the store clients block
(``requests``), and the lease must be kept alive even when the daemon's event loop is busy
or stalled. A stalled loop must not look like a healthy leader; a separate thread plus a
deadline on the monotonic clock gives exactly that: :meth:`Elector.is_leader` is true only
while ``now < lease_deadline - margin``, where ``lease_deadline`` is the monotonic time at
which the last successful keep-alive was *sent* plus the TTL granted. The server cannot
expire the lease before that, so leader-only work stops before the lease can have
expired, even if this process was paused (SIGSTOP) or the keep-alive thread starved.

Campaign: create the leader key bound to our lease if absent; epoch = its create revision.
Followers watch the leader key and campaign again as soon as it goes. Keep-alive every
TTL/3; on errors retry until the deadline minus margin, then step down. :meth:`resign`
revokes the lease (SIGTERM, switchover) so a peer takes over at once.

Every leader-only effect goes through :meth:`Elector.fenced` / :meth:`Elector.commit`:
the effect's record (and its writes) commit in a transaction comparing the epoch it
started under; a newer epoch makes it fail with :class:`Fenced`. Peers check epochs of
what they receive with :class:`EpochGuard`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from cluster import history, retry
from cluster.backend import Backend, EffectRecord, LeaderInfo, Lease
from cluster.errors import BackendUnavailable, Fenced, NotLeader, StaleEpoch
from cluster.signing import RecordSigner

log = logging.getLogger("ctrl-exec.cluster")

T = TypeVar("T")


class Elector:
    """Campaigns for leadership and keeps it (see the module docstring).

    ``on_elected(epoch)`` and ``on_demoted()`` run on the elector thread, or on the thread
    calling :meth:`resign`/:meth:`stop`; keep them short.
    """

    def __init__(
        self,
        backend: Backend,
        instance_id: str,
        *,
        ttl: int = 5,
        margin: float | None = None,
        on_elected: Callable[[int], None] | None = None,
        on_demoted: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        gate: Callable[[], bool] | None = None,
        signer: RecordSigner | None = None,
    ) -> None:
        if ttl < 1:
            raise ValueError("lease ttl must be at least 1 s")
        self.backend = backend
        self.instance_id = instance_id
        self.ttl = ttl
        self.margin = margin if margin is not None else max(0.25, ttl * 0.15)
        self.interval = ttl / 3
        self.on_elected = on_elected
        self.on_demoted = on_demoted
        self.gate = gate  # campaign only while it says yes (the instance holds its member key)
        self.signer = signer  # handover notes and terms are sealed with it (cluster.signing)
        self._clock = clock
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._lease: Lease | None = None
        self._lease_deadline = 0.0
        self._next_keepalive = 0.0
        self._leading = False
        self._epoch: int | None = None
        self._since: float | None = None  # wall-clock time this lead began
        self._last_leader: LeaderInfo | None = None
        self._hold_until = 0.0
        # when this instance began leaving the campaign to a handover target (None: not
        # now); one deferral per leaderless stretch, whatever notes appear meanwhile
        self._deferring_since: float | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"elector-{instance_id}", daemon=True
        )

    # -- public state ----------------------------------------------------------------------

    def start(self) -> Elector:
        self._thread.start()
        return self

    def is_leader(self) -> bool:
        """True only while this instance leads with time to spare on its lease."""
        with self._lock:
            return self._leading and self._clock() < self._lease_deadline - self.margin

    @property
    def epoch(self) -> int | None:
        """The epoch this instance leads under, None when it does not lead."""
        with self._lock:
            return self._epoch if self.is_leader() else None

    @property
    def last_leader(self) -> LeaderInfo | None:
        """The leader this instance saw last (itself included)."""
        with self._lock:
            return self._last_leader

    def leading_since(self) -> float | None:
        """The Unix time this instance took the lead it holds, None when not leading."""
        with self._lock:
            return self._since if self.is_leader() else None

    def lease_time_left(self) -> float | None:
        """Seconds until the lease can expire, None when not leading."""
        with self._lock:
            if not self.is_leader():
                return None
            return max(0.0, self._lease_deadline - self._clock())

    # -- resign / stop -----------------------------------------------------------------------

    def resign(
        self, hold_off: float | None = None, reason: str = "resigned", to: str = "",
        requested_by: str = "",
    ) -> None:  # fmt: skip
        """Give up leadership now (revoke the lease); do not campaign for ``hold_off`` s.

        The default hold-off is one TTL, so a switchover hands over to a peer. While
        leading, a handover note (``reason``, the member ``to`` take over) is committed
        first (:mod:`cluster.history`); failing that, the resignation goes on.
        """
        epoch = self.epoch
        if epoch is not None:
            note = history.Handover(epoch, self.instance_id, reason, to, requested_by,
                                    time.time())  # fmt: skip
            try:  # fenced, but not an effect: the history is its own record
                key = self.backend.keys.handover
                if not self.backend.fenced_commit(epoch, {key: history.seal(note, key,
                                                                            self.signer)}):  # fmt: skip
                    log.warning("handover note not recorded, epoch=%d: fenced", epoch)
            except BackendUnavailable as exc:
                log.warning("handover note not recorded, epoch=%d: %s", epoch, exc)
        with self._lock:
            lease, self._lease = self._lease, None
            self._hold_until = self._clock() + (self.ttl if hold_off is None else hold_off)
        self._demote("resigned")
        if lease is not None:
            try:
                retry.backend_call(
                    lambda: self.backend.resign(lease.id),
                    deadline=self._clock() + self.ttl,
                    attempts=5,
                )
            except BackendUnavailable as exc:
                log.warning("could not revoke lease %x (it expires by itself): %s", lease.id, exc)

    def stop(
        self, resign: bool = True, timeout: float | None = None, reason: str = "shutdown"
    ) -> None:
        """Stop campaigning; with ``resign`` revoke the lease first (SIGTERM path)."""
        if resign:
            self.resign(hold_off=math.inf, reason=reason)
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.ttl if timeout is None else timeout)
        if not resign:
            self._demote("stopped")

    # -- fenced effects ----------------------------------------------------------------------

    def fenced(
        self,
        effect: str,
        fn: Callable[[int], T],
        *,
        puts: Mapping[str, str | bytes] | None = None,
        deletes: Sequence[str] = (),
        detail: Mapping[str, Any] | None = None,
    ) -> T:
        """Run leader-only ``fn(epoch)`` and commit its record under the epoch it started with.

        Raises :class:`NotLeader` when not leading (before or after ``fn``) and
        :class:`Fenced` when the commit is refused because a newer epoch exists.
        ``fn``'s own side effects must become visible only through what is committed here.
        """
        epoch = self._require_leader(effect)
        log.info("leader-only action %s starting, epoch=%d", effect, epoch)
        result = fn(epoch)
        self._commit(effect, epoch, puts, deletes, detail)
        return result

    def commit(
        self,
        effect: str,
        puts: Mapping[str, str | bytes] | None = None,
        deletes: Sequence[str] = (),
        detail: Mapping[str, Any] | None = None,
        *,
        epoch: int | None = None,
    ) -> EffectRecord:
        """Commit leader-only writes plus their effect record under the current epoch.

        With ``epoch`` (the epoch an operation began under) the commit is refused with
        :class:`NotLeader` unless this instance still leads under exactly that epoch, and
        with :class:`Fenced` if the store knows a newer one.
        """
        if epoch is None:
            epoch = self._require_leader(effect)
        return self._commit(effect, epoch, puts, deletes, detail)

    def commit_effects(
        self, epoch: int, items: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> list[EffectRecord]:
        """Commit one effect record per ``(effect, detail)`` in **one** transaction under
        ``epoch``, fenced as :meth:`commit` is: refused as a whole with :class:`NotLeader`
        unless this instance still leads under exactly that epoch, and with :class:`Fenced`
        if the store knows a newer one."""
        what = ",".join(sorted({effect for effect, _ in items})) or "effects"
        if self.epoch != epoch:
            log.warning("leader-only action %s not committed, epoch=%d: no longer leader",
                        what, epoch)  # fmt: skip
            raise NotLeader(f"{what}: leadership of epoch {epoch} ended")
        recs = self.backend.record_effects(epoch, self.instance_id, items)
        if recs is None:
            log.warning("leader-only action %s fenced, epoch=%d is not current", what, epoch)
            raise Fenced(what, epoch)
        if recs:
            log.info("leader-only action %s committed, epoch=%d revision=%d effects=%d",
                     what, epoch, recs[0].revision, len(recs))  # fmt: skip
        return recs

    def _require_leader(self, effect: str) -> int:
        epoch = self.epoch
        if epoch is None:
            raise NotLeader(f"{effect}: this instance ({self.instance_id}) is not the leader")
        return epoch

    def _commit(
        self,
        effect: str,
        epoch: int,
        puts: Mapping[str, str | bytes] | None,
        deletes: Sequence[str],
        detail: Mapping[str, Any] | None,
    ) -> EffectRecord:
        if self.epoch != epoch:
            log.warning(
                "leader-only action %s not committed, epoch=%d: no longer leader", effect, epoch
            )
            raise NotLeader(f"{effect}: leadership of epoch {epoch} ended")
        rec = self.backend.record_effect(epoch, effect, self.instance_id, detail, puts, deletes)
        if rec is None:
            log.warning("leader-only action %s fenced, epoch=%d is not current", effect, epoch)
            raise Fenced(effect, epoch)
        log.info(
            "leader-only action %s committed, epoch=%d revision=%d", effect, epoch, rec.revision
        )
        return rec

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    leading = self._leading
                if leading:
                    self._lead_once()
                else:
                    self._follow_once()
            except BackendUnavailable as exc:
                log.warning("election: coordination store unavailable: %s", exc)
                self._stop.wait(min(1.0, self.interval))
            except Exception:
                log.exception("election loop error")
                self._stop.wait(min(1.0, self.interval))

    def _demote(self, reason: str) -> None:
        with self._lock:
            was, epoch = self._leading, self._epoch
            self._leading = False
            self._epoch = None
            self._since = None
        if was:
            log.warning("stepping down as leader, epoch=%s: %s", epoch, reason)
            if self.on_demoted is not None:
                self.on_demoted()

    def _ensure_lease(self) -> Lease | None:
        with self._lock:
            lease = self._lease
        now = self._clock()
        if lease is None:
            lease = self.backend.lease_grant(self.ttl)
            with self._lock:
                self._lease = lease
                self._lease_deadline = now + lease.ttl
                self._next_keepalive = now + self.interval
            return lease
        if now >= self._next_keepalive:
            left = self.backend.keepalive(lease.id)
            with self._lock:
                if self._lease is not lease:
                    return None
                if left <= 0:
                    self._lease = None
                    return None
                self._lease_deadline = now + left
                self._next_keepalive = now + self.interval
        return lease

    def _follow_once(self) -> None:
        lease = self._ensure_lease()
        if lease is None:
            return
        now = self._clock()
        with self._lock:
            hold = self._hold_until
        if now < hold:
            self._stop.wait(min(hold - now, self.interval))
            return
        if self.gate is not None and not self.gate():
            self._stop.wait(min(0.1, self.interval))
            return
        if self._leave_to_target(now):
            self._stop.wait(self.interval / 2)
            return
        res = self.backend.campaign(lease.id, self.instance_id)
        with self._lock:
            self._last_leader = res.leader
            if res.leader is not None:
                self._deferring_since = None  # a leader again: the next gap may defer anew
        if res.won and res.leader is not None:
            self._take_lead(lease, res.leader.epoch)
            return
        if res.revision == 0:
            return  # the key vanished in between: campaign again at once
        timeout = max(0.05, min(self._next_keepalive - self._clock(), self.interval))
        self.backend.wait_leader_change(res.revision + 1, timeout)

    def _leave_to_target(self, now: float) -> bool:
        """A handover note at least as new as the last leader this instance saw names
        another member: leave the campaign to it for a while (measured from when this
        instance first deferred). An ex-leader that resigned defers too. The deferral lasts
        at most ``HANDOVER_WAIT_TTLS`` TTLs per leaderless stretch, so notes forged in etcd
        can delay a failover by that much, never prevent it."""
        with self._lock:
            last = self._last_leader
        note = history.read_handover(self.backend, self.signer)
        if note is None or not note.to or note.to == self.instance_id:
            return False
        if last is not None and note.epoch < last.epoch:
            return False  # a stale note from before the leader this instance knows
        if self._deferring_since is None:
            self._deferring_since = now
        return now - self._deferring_since < history.HANDOVER_WAIT_TTLS * self.ttl

    def _record_term(self, epoch: int) -> None:
        """The history record of this epoch (best effort: leadership never waits on it)."""
        try:
            term, puts, deletes = history.takeover(self.backend, self.instance_id, epoch,
                                                   signer=self.signer)  # fmt: skip
            if self.epoch != epoch or not self.backend.fenced_commit(epoch, puts, deletes):
                log.warning("leadership history not recorded, epoch=%d: fenced", epoch)
                return
            log.info("term %d: %s leads (epoch %d): %s", term.term, self.instance_id, epoch,
                     term.reason)  # fmt: skip
        except BackendUnavailable as exc:
            log.warning("leadership history not recorded, epoch=%d: %s", epoch, exc)

    def _take_lead(self, lease: Lease, epoch: int) -> None:
        sent = self._clock()
        try:
            left = self.backend.keepalive(lease.id)  # a full TTL ahead of us from now
        except BackendUnavailable:
            left = None
        with self._lock:
            if self._lease is not lease or self._stop.is_set():
                return  # resigned meanwhile
            if left is not None:
                if left <= 0:
                    self._lease = None
                    return
                self._lease_deadline = sent + left
                self._next_keepalive = sent + self.interval
            self._leading = True
            self._epoch = epoch
            self._since = time.time()
            self._last_leader = LeaderInfo(self.instance_id, epoch, lease.id)
        log.info("elected leader, epoch=%d, lease %x ttl=%d", epoch, lease.id, self.ttl)
        if self.on_elected is not None:
            self.on_elected(epoch)
        self._record_term(epoch)

    def _lead_once(self) -> None:
        wait = self._next_keepalive - self._clock()
        if wait > 0 and self._stop.wait(wait):
            return
        with self._lock:
            lease, epoch = self._lease, self._epoch
            give_up = self._lease_deadline - self.margin
        if lease is None or epoch is None or not self.is_leader():
            if self._clock() >= give_up:
                self._demote("lease deadline passed before it was renewed")
            return
        sent = [0.0]

        def keepalive() -> int:
            sent[0] = self._clock()
            return self.backend.keepalive(lease.id)

        try:
            left = retry.keepalive_call(
                keepalive, give_up_at=give_up, interval=max(0.05, self.ttl / 10), stop=self._stop
            )
        except BackendUnavailable as exc:
            with self._lock:
                if self._lease is lease:
                    self._lease = None  # cannot revoke it; it will expire
            self._demote(f"lease not renewed in time: {exc}")
            return
        with self._lock:
            if self._lease is not lease:
                return
            if left <= 0:
                self._lease = None
            else:
                self._lease_deadline = sent[0] + left
                self._next_keepalive = sent[0] + self.interval
        if left <= 0:
            self._demote("lease expired")
            return
        try:
            info = self.backend.leader()
        except BackendUnavailable:
            return  # the lease is fine; check the key next round
        if info is None or info.epoch != epoch:
            self._demote(f"leader key lost (now {info})")
        else:
            with self._lock:
                self._last_leader = info


class EpochGuard:
    """Peers refuse anything from an epoch older than the newest they have seen."""

    def __init__(self, newest: int = 0) -> None:
        self._newest = newest
        self._lock = threading.Lock()

    @property
    def newest(self) -> int:
        with self._lock:
            return self._newest

    def check(self, epoch: int) -> None:
        """Accept ``epoch`` (remembering it) or raise :class:`StaleEpoch`."""
        with self._lock:
            if epoch < self._newest:
                raise StaleEpoch(epoch, self._newest)
            self._newest = epoch
