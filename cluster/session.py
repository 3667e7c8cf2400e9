"""An instance's session lease: its member key and its run locks are bound to it.

Separate from the election lease on purpose: resigning leadership (switchover) must not
drop the instance's membership or the locks of runs in flight. A thread keeps the lease
alive at TTL/3; if the lease is lost (store unreachable past the TTL), a new one is
granted and the member key registered again; run locks held under the old lease are gone
and their handles report ``lost``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cluster import retry
from cluster.backend import Backend, Lease, MemberInfo
from cluster.errors import BackendUnavailable

log = logging.getLogger("ctrl-exec.cluster")


class Session:
    """Keeps one lease alive and the member key registered under it."""

    def __init__(
        self,
        backend: Backend,
        *,
        ttl: int = 5,
        member: MemberInfo | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.ttl = ttl
        self.interval = ttl / 3
        self._member = member
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lease: Lease | None = None
        self._granted = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-session", daemon=True)

    def start(self) -> Session:
        self._thread.start()
        return self

    def lease_id(self, timeout: float | None = None) -> int:
        """The current lease (granting one now if the thread has not yet)."""
        with self._lock:
            lease = self._lease
        # set but not yet granted: the thread is registering the member key under it
        if (lease is None or not self._granted.is_set()) and self._thread.is_alive():
            self._granted.wait(self.ttl if timeout is None else timeout)
            with self._lock:
                lease = self._lease
        if lease is None:
            lease = self._grant()
        return lease.id

    def current_lease_id(self) -> int | None:
        """The lease held right now, without waiting or granting (None while there is none)."""
        with self._lock:
            return None if self._lease is None else self._lease.id

    def is_current(self, lease_id: int) -> bool:
        with self._lock:
            return self._lease is not None and self._lease.id == lease_id

    @property
    def member(self) -> MemberInfo | None:
        with self._lock:
            return self._member

    def update_member(self, **changes: Any) -> MemberInfo:
        """Change fields of the member record (state, generation, cert_serial...) and publish."""
        with self._lock:
            if self._member is None:
                raise ValueError("this session has no member record")
            self._member = dataclasses.replace(self._member, **changes)
            member, lease = self._member, self._lease
        if lease is not None:
            self.backend.register_member(lease.id, member)
        return member

    def close(self, revoke: bool = True) -> None:
        """Stop the thread; with ``revoke`` the member key and the locks go at once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.ttl)
        with self._lock:
            lease, self._lease = self._lease, None
        if revoke and lease is not None:
            try:
                self.backend.resign(lease.id)
            except BackendUnavailable as exc:
                log.warning("could not revoke session lease %x: %s", lease.id, exc)

    def _grant(self) -> Lease:
        lease = retry.backend_call(
            lambda: self.backend.lease_grant(self.ttl),
            deadline=self._clock() + self.ttl,
            stop=self._stop,
        )
        with self._lock:
            self._lease = lease
            member = self._member
        if member is not None:
            self.backend.register_member(lease.id, member)
        self._granted.set()
        log.info("session lease %x granted (ttl %d)", lease.id, lease.ttl)
        return lease

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    lease = self._lease
                if lease is None:
                    self._grant()
                elif self.backend.keepalive(lease.id) <= 0:
                    log.warning(
                        "session lease %x lost; member key and run locks are gone", lease.id
                    )
                    with self._lock:
                        if self._lease is lease:
                            self._lease = None
                    self._granted.clear()
                    continue
            except BackendUnavailable as exc:
                log.warning("session keep-alive failed: %s", exc)
                self._stop.wait(min(1.0, self.interval / 2))
                continue
            self._stop.wait(self.interval)
