""":class:`RoleSnapshot`, what the coordination backend knows right now (read by the health
port, :mod:`dispatcher.api.healthport`, and the metrics), and :class:`ClusterRole`, the
health port's view of an :class:`~cluster.election.Elector`:

* ``role``: ``leader`` while the elector leads with time to spare; ``follower`` while the
  store answers and someone else leads (or nobody, during an election); ``unknown`` while
  the store is unreachable and this instance does not lead.
* ``leader_id``: the leader last read from the store (the monitor reads it every half
  second); null while the store is unreachable.
* ``epoch``: the newest epoch this instance has seen, kept across outages.
* ``lease_ttl``/``lease_time_left``: only while leading.
* ``leader_since``: the Unix time this instance took the lead, only while leading.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from cluster.backend import LeaderInfo
from cluster.election import Elector, EpochGuard
from dispatcher.ha.storehealth import ClusterHealth


@dataclass(frozen=True)
class RoleSnapshot:
    """What the coordination backend knows right now."""

    instance_id: str
    role: str  # "leader", "follower" or "unknown"
    leader_id: str | None
    epoch: int | None  # newest epoch seen; None before any
    lease_ttl: float | None  # None when not leading
    lease_time_left: float | None  # None when not leading
    generation: int
    etcd: str  # "ok" or "unreachable"
    backend: str  # "local" or "etcd"
    leader_since: float | None = None  # Unix time this instance took the lead; None else


class ClusterRole:
    """:class:`~dispatcher.api.healthport.RoleProvider` over an elector."""

    def __init__(
        self,
        elector: Elector,
        *,
        backend_kind: str,
        health: ClusterHealth | None = None,
        generation: Callable[[], int] = lambda: 0,
        on_resign: Callable[[], None] | None = None,
    ) -> None:
        self.elector = elector
        self.backend_kind = backend_kind
        self.health = health
        self.generation = generation
        self.on_resign = on_resign
        self.guard = EpochGuard()  # newest epoch seen; peers refuse older ones
        self._lock = threading.Lock()
        self._observed: LeaderInfo | None = None
        self._changes = 0
        self._last_epoch: int | None = None
        self._gone_after = 0  # the newest epoch known when the store last showed no leader

    # -- what the monitor and the elector callbacks feed in ---------------------------------

    def observe(self, leader: LeaderInfo | None) -> None:
        """The leader key as just read from the store (None: no leader right now)."""
        with self._lock:
            self._observed = leader
            if leader is None:
                self._gone_after = self._last_epoch or 0
            if leader is not None and leader.epoch != self._last_epoch:
                if self._last_epoch is not None and leader.epoch > self._last_epoch:
                    self._changes += 1
                self._last_epoch = max(leader.epoch, self._last_epoch or 0)
        if leader is not None and leader.epoch >= self.guard.newest:
            self.guard.check(leader.epoch)

    def forget_self(self) -> None:
        """On demotion: do not report ourselves as the leader until the store says so."""
        with self._lock:
            if (
                self._observed is not None
                and self._observed.instance_id == self.elector.instance_id
            ):
                self._observed = None

    @property
    def leader_changes(self) -> int:
        """How many times this instance has seen a new epoch (after the first one)."""
        with self._lock:
            return self._changes

    def observed(self) -> LeaderInfo | None:
        with self._lock:
            return self._observed

    # -- RoleProvider ----------------------------------------------------------------------

    def _reachable(self) -> bool:
        return self.health is None or self.health.ok

    def snapshot(self) -> RoleSnapshot:
        me = self.elector.instance_id
        epoch = self.elector.epoch
        left = self.elector.lease_time_left()
        leading = epoch is not None and left is not None
        if epoch is not None and left is not None:
            with self._lock:
                known = self._last_epoch == epoch
            if not known:
                self.observe(LeaderInfo(me, epoch, 0))
        reachable = self._reachable()
        with self._lock:
            seen = self._last_epoch
            observed = self._observed
            gone_after = self._gone_after
        last = self.elector.last_leader
        if last is not None and (seen is None or last.epoch > seen):
            seen = last.epoch
        # the elector learns of a new leader at once (it watches the key); the monitor
        # reads it every half second: take whichever is newer
        if last is not None and (
            (observed is None and last.epoch > gone_after)
            or (observed is not None and last.epoch > observed.epoch)
        ):
            observed = last
        leader_id: str | None
        if leading:
            role, leader_id = "leader", me
        elif reachable:
            role = "follower"
            leader_id = observed.instance_id if observed is not None else None
            if leader_id == me:  # the store still shows our key; we stopped leading
                leader_id = None
        else:
            role, leader_id = "unknown", None
        return RoleSnapshot(
            instance_id=me,
            role=role,
            leader_id=leader_id,
            epoch=seen,
            lease_ttl=float(self.elector.ttl) if leading else None,
            lease_time_left=round(left, 3) if leading and left is not None else None,
            generation=int(self.generation()),
            etcd="ok" if reachable else "unreachable",
            backend=self.backend_kind,
            leader_since=self.elector.leading_since() if leading else None,
        )

    def tick(self) -> None:
        return None  # the elector and the monitor run in their own threads

    def resign(self) -> None:
        """SIGTERM: revoke the election lease now and never campaign again."""
        if self.on_resign is not None:
            self.on_resign()
        else:
            self.elector.stop(resign=True)
