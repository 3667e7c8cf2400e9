"""Cluster-wide host:script run locks, the same shape as ``dispatcher/runlocks.py``.

``acquire_all(pairs)`` takes every lock or none, and a conflict raises
:class:`LockConflict` listing every ``host:script`` already running. :class:`LockConflict`
and :class:`LockHandle` (what every ``acquire_all`` returns) are shared with the
dispatcher's local and HA run locks; this module stays light (``ced run`` loads it), so
the backend and session types are only annotations. :func:`try_flock` is the one
non-blocking ``flock`` of the project's local locks and leases. With etcd the locks
are keys ``/<cluster>/locks/<host>--<script>`` bound to the instance's session lease, so a
crashed instance's locks vanish after the TTL; with the local backend they live in the
state directory and are bound to a ``flock`` held by this process. Each handle has a
random token in its keys' values, so a release never deletes another holder's lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Self

from cluster.errors import BackendUnavailable, ClusterError

if TYPE_CHECKING:
    from cluster.backend import Backend
    from cluster.session import Session


def try_flock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting; False when someone holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class LockConflict(ClusterError):
    """Some host:script pairs are already running; ``conflicts`` lists them."""

    def __init__(self, conflicts: list[str]) -> None:
        self.conflicts = conflicts
        super().__init__(f"already running: {', '.join(conflicts)}")


class LockUnavailable(BackendUnavailable):
    """The cluster-wide run lock cannot be taken (the store does not answer) and the
    configuration refuses to run under the local lock alone."""


class LockHandle(ABC):
    """Locks held for one run (``pairs``); released by :meth:`release` or leaving the ``with``.

    :meth:`release` may be called more than once; only the first call releases.
    """

    pairs: list[tuple[str, str]]

    @abstractmethod
    def release(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class ClusterHeldLocks(LockHandle):
    """The cluster-wide keys of one run, bound to the session lease they were taken under."""

    def __init__(
        self,
        backend: Backend,
        session: Session,
        pairs: list[tuple[str, str]],
        token: str,
        owner: str,
        lease_id: int,
    ) -> None:
        self.pairs = pairs
        self._backend = backend
        self._session = session
        self._token = token
        self._owner = owner
        self._lease_id = lease_id
        self._held = bool(pairs)

    @property
    def held(self) -> bool:
        return self._held

    @property
    def token(self) -> str:
        """The random token in this handle's lock values (a release names it)."""
        return self._token

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def lost(self) -> bool:
        """True when the session lease these locks were bound to is gone."""
        return self._held and not self._session.is_current(self._lease_id)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._backend.run_lock_release(self.pairs, self._token, self._owner)


class ClusterRunLocks:
    """Run locks for every instance of the cluster (the ``RunLocks`` interface)."""

    def __init__(self, backend: Backend, session: Session, owner: str) -> None:
        self.backend = backend
        self.session = session
        self.owner = owner

    def acquire_all(self, pairs: list[tuple[str, str]]) -> ClusterHeldLocks:
        """Take every host:script lock without blocking, or none (:class:`LockConflict`)."""
        import secrets  # not at module level: hashlib and random, for this call only

        unique = list(dict.fromkeys(pairs))
        token = secrets.token_hex(8)
        lease_id = self.session.lease_id()
        conflicts = self.backend.run_lock_acquire(unique, token, self.owner, lease_id)
        if conflicts:
            raise LockConflict(conflicts)
        return ClusterHeldLocks(self.backend, self.session, unique, token, self.owner, lease_id)

    def list_held(self) -> list[tuple[str, str]]:
        """Sorted (host, script) of every lock held anywhere in the cluster."""
        return self.backend.run_locks_held()


class LeasedHeldLocks(LockHandle):
    """Cluster-wide keys bound to a lease of their own (one ``ced run``).

    A thread keeps the lease alive every TTL/3 until :meth:`release`, which revokes it (the
    keys go with it). A process killed while holding them frees them when the lease
    expires, at most one TTL later. When a keep-alive finds the lease gone (the store was
    unreachable for a whole TTL), :attr:`lost` turns True and ``on_lost`` is called once.
    """

    def __init__(
        self,
        backend: Backend,
        pairs: list[tuple[str, str]],
        token: str,
        owner: str,
        lease_id: int,
        ttl: int,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        import threading  # not at module level: the no-etcd ``ced run`` never needs it

        self.pairs = pairs
        self.token = token
        self.owner = owner
        self.lease_id = lease_id
        self.ttl = ttl
        self._backend = backend
        self._on_lost = on_lost
        self._lost = False
        self._held = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keepalive, name="run-lock-lease",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    @property
    def held(self) -> bool:
        return self._held

    @property
    def lost(self) -> bool:
        return self._lost

    def _keepalive(self) -> None:
        interval = max(0.2, self.ttl / 3)
        while not self._stop.wait(interval):
            try:
                left = self._backend.keepalive(self.lease_id)
            except BackendUnavailable:
                continue  # the lease lives on until its TTL: try again next round
            if left <= 0:
                self._lost = True
                if self._on_lost is not None:
                    self._on_lost(f"lease {self.lease_id:x} expired")
                return

    def release(self) -> None:
        """Stop the keep-alive and revoke the lease (raises BackendUnavailable when the
        store does not answer: the keys then go when the lease expires)."""
        if not self._held:
            return
        self._held = False
        self._stop.set()
        self._thread.join(timeout=5)
        self._backend.resign(self.lease_id)


class LeasedRunLocks:
    """Run locks for a short-lived process (``ced run``): each acquisition grants a lease
    of ``ttl`` seconds, binds the keys to it and keeps it alive until released."""

    def __init__(
        self,
        backend: Backend,
        owner: str,
        ttl: int,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.backend = backend
        self.owner = owner
        self.ttl = max(1, int(ttl))
        self.on_lost = on_lost

    def acquire_all(self, pairs: list[tuple[str, str]]) -> LeasedHeldLocks:
        """Take every host:script lock without blocking, or none (:class:`LockConflict`);
        :class:`~cluster.errors.BackendUnavailable` when the store does not answer."""
        import secrets

        unique = list(dict.fromkeys(pairs))
        token = secrets.token_hex(8)
        lease = self.backend.lease_grant(self.ttl)
        try:
            conflicts = self.backend.run_lock_acquire(unique, token, self.owner, lease.id)
        except BaseException:
            with contextlib.suppress(ClusterError):
                self.backend.resign(lease.id)
            raise
        if conflicts:
            with contextlib.suppress(ClusterError):
                self.backend.resign(lease.id)
            raise LockConflict(conflicts)
        return LeasedHeldLocks(self.backend, unique, token, self.owner, lease.id, lease.ttl,
                               self.on_lost)  # fmt: skip

    def list_held(self) -> list[tuple[str, str]]:
        return self.backend.run_locks_held()
