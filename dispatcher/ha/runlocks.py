"""Run locks for an HA instance: cluster-wide with etcd, never dependent on it.

:class:`HARunLocks` is a :class:`~dispatcher.runlocks.RunLocks`. Each run takes the local
``flock`` locks (``<locks_dir>``) first, then the cluster-wide keys through
:class:`cluster.locks.ClusterRunLocks` (bound to the instance's session lease). Local and
cluster conflicts are the same :class:`cluster.locks.LockConflict`, which the CLI and the
API answer as upstream does (code 4).

While the store is unreachable (or the session has no lease yet) runs go on with the local
locks alone and a warning: losing etcd costs pairing and rotation, never run and ping
(DESIGN.md section 3). The same host:script can then run through two instances at once;
the local lock still serialises runs on each instance (and across instances sharing
``locks_dir``). With ``run_lock_without_etcd = refuse`` a run is refused instead
(:class:`~cluster.locks.LockUnavailable`: ``ced`` exits 1 with ``Error: run lock
unavailable: ...``, the API answers 503 ``cluster unavailable``): never two runs of one
host:script, at the price of no runs while etcd is down. The CLI and the API follow the
same rule.

``ced`` on a dispatcher host with etcd configured takes the same locks through
:class:`CLIRunLocks`: the local ``flock`` and the same cluster keys, bound to a lease the
process grants for the run (kept alive while it lasts, revoked at its end, expired one TTL
after a crash), and the same fallback to the local lock alone while etcd is unreachable.

A release that cannot reach the store is queued and retried by the monitor thread; until
then the key stays bound to the session lease (it goes with the lease at the latest).
"""

from __future__ import annotations

import logging
import threading

from agent.common import logfmt
from cluster.errors import BackendUnavailable
from cluster.locks import (
    ClusterHeldLocks,
    ClusterRunLocks,
    LeasedHeldLocks,
    LeasedRunLocks,
    LockHandle,
    LockUnavailable,
)
from dispatcher.config import DispatcherConfig
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.runlocks import LocalRunLocks, RunLocks

PendingRelease = tuple[list[tuple[str, str]], str, str]  # pairs, token, owner


class HAHeldLocks(LockHandle):
    """Local locks plus (when the store answered) the cluster-wide keys of one run."""

    def __init__(
        self,
        pairs: list[tuple[str, str]],
        local: LockHandle,
        cluster: ClusterHeldLocks | None,
        owner: HARunLocks,
    ) -> None:
        self.pairs = pairs
        self.local = local
        self.cluster = cluster
        self._owner = owner

    @property
    def cluster_wide(self) -> bool:
        return self.cluster is not None

    def release(self) -> None:
        cluster, self.cluster = self.cluster, None
        try:
            if cluster is not None and cluster.held:
                try:
                    cluster.release()
                except BackendUnavailable as exc:
                    self._owner.release_failed(cluster, exc)
        finally:
            self.local.release()


class HARunLocks:
    """:class:`RunLocks`: local ``flock`` plus cluster-wide keys while the store answers."""

    def __init__(
        self, cluster: ClusterRunLocks, local: RunLocks, health: ClusterHealth,
        refuse: bool = False,
    ) -> None:  # fmt: skip
        self.cluster = cluster
        self.local = local
        self.health = health
        self.refuse = refuse  # run_lock_without_etcd = refuse
        self._pending: list[PendingRelease] = []
        self._lock = threading.Lock()

    def _fallback(self, reason: str) -> None:
        _fallback(reason, self.refuse)

    def acquire_all(self, pairs: list[tuple[str, str]]) -> HAHeldLocks:
        unique = list(dict.fromkeys(pairs))
        local = self.local.acquire_all(unique)  # a LockConflict propagates, as the cluster's
        try:
            if not self.health.ok:
                self._fallback(f"cluster unavailable: {self.health.error}")
                return HAHeldLocks(unique, local, None, self)
            if self.cluster.session.current_lease_id() is None:
                self._fallback("no session lease yet")
                return HAHeldLocks(unique, local, None, self)
            try:
                held = self.cluster.acquire_all(unique)
            except BackendUnavailable as exc:
                self.health.mark_failed(exc)
                self._fallback(f"cluster unavailable: {exc}")
                return HAHeldLocks(unique, local, None, self)
            return HAHeldLocks(unique, local, held, self)
        except BaseException:
            local.release()
            raise

    def list_held(self) -> list[tuple[str, str]]:
        held = set(self.local.list_held())
        if self.health.ok:
            try:
                held.update(self.cluster.list_held())
            except BackendUnavailable as exc:
                self.health.mark_failed(exc)
        return sorted(held, key=lambda p: f"{p[0]}:{p[1]}")

    # -- releases that could not reach the store -------------------------------------------

    def release_failed(self, held: ClusterHeldLocks, exc: BaseException) -> None:
        self.health.mark_failed(exc)
        logfmt.event("run-lock-release", logging.WARNING, result="deferred", error=exc,
                     locks=",".join(f"{h}:{s}" for h, s in held.pairs))  # fmt: skip
        with self._lock:
            self._pending.append((list(held.pairs), held.token, held.owner))

    def retry_releases(self) -> int:
        """Retry deferred releases (monitor thread); returns how many are still pending."""
        with self._lock:
            todo, self._pending = self._pending, []
        left: list[PendingRelease] = []
        for i, (pairs, token, owner) in enumerate(todo):
            try:
                self.cluster.backend.run_lock_release(pairs, token, owner)
            except BackendUnavailable:
                left.extend(todo[i:])
                break
        with self._lock:
            self._pending[:0] = left
            return len(self._pending)


def _fallback(reason: str, refuse: bool) -> None:
    """Log the run going on under the local lock alone, or refuse it (LockUnavailable)."""
    if refuse:
        logfmt.event("run-lock-refused", logging.WARNING, reason=reason,
                     policy="run_lock_without_etcd=refuse")  # fmt: skip
        raise LockUnavailable(f"run lock unavailable: {reason} (run_lock_without_etcd = refuse)")
    logfmt.event("run-lock-fallback", logging.WARNING, scope="local", reason=reason)


class CLIHeldLocks(LockHandle):
    """The local locks plus (when the store answered) the leased cluster keys of one run."""

    def __init__(
        self, pairs: list[tuple[str, str]], local: LockHandle, cluster: LeasedHeldLocks | None
    ) -> None:
        self.pairs = pairs
        self.local = local
        self.cluster = cluster

    @property
    def cluster_wide(self) -> bool:
        return self.cluster is not None

    def release(self) -> None:
        cluster, self.cluster = self.cluster, None
        try:
            if cluster is not None and cluster.held:
                try:
                    cluster.release()
                except BackendUnavailable as exc:
                    logfmt.event("run-lock-release", logging.WARNING, result="deferred",
                                 error=exc, expires_in=cluster.ttl,
                                 locks=",".join(f"{h}:{s}" for h, s in cluster.pairs))  # fmt: skip
        finally:
            self.local.release()


class CLIRunLocks:
    """:class:`RunLocks` of a one-shot ``ced`` with etcd configured.

    The same locks as an API instance's (:class:`HARunLocks`): the local ``flock`` in
    ``locks_dir`` first, then the cluster-wide keys, bound to a lease this process grants
    for the run (:class:`~cluster.locks.LeasedRunLocks`: kept alive while the run lasts,
    revoked at its end; a killed ``ced`` frees them when the lease expires). When the store
    does not answer, the run goes on under the local lock alone with a warning, as the API
    does (DESIGN.md section 3: losing etcd never costs run), unless the configuration
    says ``run_lock_without_etcd = refuse``.
    """

    def __init__(self, cluster: LeasedRunLocks, local: RunLocks, refuse: bool = False) -> None:
        self.cluster = cluster
        self.local = local
        self.refuse = refuse  # run_lock_without_etcd = refuse

    def acquire_all(self, pairs: list[tuple[str, str]]) -> CLIHeldLocks:
        unique = list(dict.fromkeys(pairs))
        local = self.local.acquire_all(unique)
        try:
            try:
                held = self.cluster.acquire_all(unique)
            except BackendUnavailable as exc:
                _fallback(f"cluster unavailable: {exc}", self.refuse)
                return CLIHeldLocks(unique, local, None)
            return CLIHeldLocks(unique, local, held)
        except BaseException:
            local.release()
            raise

    def list_held(self) -> list[tuple[str, str]]:
        held = set(self.local.list_held())
        try:
            held.update(self.cluster.list_held())
        except BackendUnavailable as exc:
            logfmt.event("list-locks", logging.WARNING, scope="local",
                         reason=f"cluster unavailable: {exc}")  # fmt: skip
        return sorted(held, key=lambda p: f"{p[0]}:{p[1]}")


def _lease_lost(reason: str) -> None:
    logfmt.event("run-lock-lost", logging.WARNING, reason=reason)


def cli_run_locks(cfg: DispatcherConfig) -> CLIRunLocks:
    """The run locks of ``ced`` on a dispatcher host with ``etcd_endpoints`` set."""
    import os
    import socket

    from dispatcher.ha.coordination import backend_from_config, lease_ttl

    owner = f"ced@{socket.gethostname()}:{os.getpid()}"
    leased = LeasedRunLocks(backend_from_config(cfg), owner, lease_ttl(cfg), _lease_lost)
    return CLIRunLocks(leased, LocalRunLocks(cfg.locks_dir),
                       refuse=cfg.run_lock_without_etcd == "refuse")  # fmt: skip
