"""An instance's session lease: its member key and its run locks are bound to it.

Separate from the election lease on purpose: resigning leadership (switchover) must not
drop the instance's membership or the locks of runs in flight. A thread keeps the lease
alive at TTL/3; if the lease is lost (store unreachable past the TTL), a new one is
granted and the member key registered again; run locks held under the old lease are gone
and their handles report ``lost``.

Membership is exclusive. The member key is created only if absent, bound to this
session's lease (:meth:`~cluster.backend.Backend.claim_member`), rewritten only while it
is still bound to it, and deleted on close only if it still is. :meth:`Session.join` (the
daemon's start) claims it before anything else runs: another live process holding the
same instance id, or another live member advertising the same address, makes it raise
:class:`~cluster.errors.MemberConflict` after waiting up to ``wait`` seconds (the key of
a crashed predecessor goes when its lease expires). Every keep-alive round checks the
key: gone (lease expired after a long pause, deleted by hand) it is created again; held
by another process it is a conflict, reported once to ``on_conflict`` and never
overwritten. :meth:`holds_member` gates the election.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cluster import retry
from cluster.backend import Backend, Lease, MemberClaim, MemberInfo
from cluster.errors import BackendUnavailable, MemberConflict

log = logging.getLogger("ctrl-exec.cluster")


def _address(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an advertise URL, for comparing two (None: unparsable)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    scheme = parts.scheme.lower()
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


class Session:
    """Keeps one lease alive and the member key registered under it (exclusively)."""

    def __init__(
        self,
        backend: Backend,
        *,
        ttl: int = 5,
        member: MemberInfo | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_conflict: Callable[[MemberConflict], None] | None = None,
    ) -> None:
        self.backend = backend
        self.ttl = ttl
        self.interval = ttl / 3
        self._member = member
        self._clock = clock
        self._on_conflict = on_conflict
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lease: Lease | None = None
        self._held = False  # the member key is bound to the current lease
        self._ever_held = False
        self._conflict: MemberConflict | None = None
        self._granted = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-session", daemon=True)

    def start(self) -> Session:
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def join(self, wait: float = 0.0) -> Session:
        """Take the lease and the member key now, then keep them in the thread.

        Waits up to ``wait`` s for a key held by another lease (a crashed predecessor's
        expires within its TTL), then raises :class:`MemberConflict` (the lease revoked).
        Raises :class:`BackendUnavailable` when the store does not answer: then call
        :meth:`start`, the thread claims the key once it can.
        """
        lease = self._grant(claim=False)
        member = self.member
        if member is not None:
            deadline = self._clock() + wait
            while True:
                try:
                    self._claim(lease.id, member)
                    break
                except MemberConflict:
                    if self._clock() >= deadline or self._stop.is_set():
                        self.close(revoke=True)
                        raise
                    self._stop.wait(min(0.25, max(0.01, deadline - self._clock())))
                    member = self.member or member
        self._granted.set()
        return self.start()

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

    def holds_member(self) -> bool:
        """The member key is ours under the current lease (the election waits for it)."""
        with self._lock:
            return self._held and self._lease is not None

    @property
    def conflict(self) -> MemberConflict | None:
        """The last conflict seen (another process holds the key), None while there is none."""
        with self._lock:
            return self._conflict

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
            self._publish(lease.id, member)
        return member

    def close(self, revoke: bool = True) -> None:
        """Stop the thread; with ``revoke`` the member key (if still ours) and locks go."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.ttl)
        with self._lock:
            lease, self._lease = self._lease, None
            held, self._held = self._held, False
            member = self._member
        if revoke and lease is not None:
            try:
                if held and member is not None:
                    self.backend.release_member(lease.id, member.instance_id)
                self.backend.resign(lease.id)
            except BackendUnavailable as exc:
                log.warning("could not revoke session lease %x: %s", lease.id, exc)

    # -- the member key --------------------------------------------------------------------

    def _address_holder(self, member: MemberInfo) -> MemberInfo | None:
        """Another live member that advertises the address ``member`` advertises."""
        mine = _address(member.advertise_url) if member.advertise_url else None
        if mine is None:
            return None
        for other in self.backend.members():
            if other.instance_id != member.instance_id and _address(other.advertise_url) == mine:
                return other
        return None

    def _claim(self, lease_id: int, member: MemberInfo) -> MemberClaim:
        """Make the member key ours (create if absent); raise MemberConflict when another
        process holds it, or (until first held) when another member has our address."""
        with self._lock:
            first = not self._ever_held
        if first and (other := self._address_holder(member)) is not None:
            raise MemberConflict("advertise_url", member.instance_id, other.instance_id,
                                 other.holder())  # fmt: skip
        claim = self.backend.claim_member(lease_id, member)
        if not claim.held:
            holder = claim.holder or MemberInfo(member.instance_id)
            raise MemberConflict("instance_id", member.instance_id, holder.instance_id,
                                 holder.holder())  # fmt: skip
        if first and (other := self._address_holder(member)) is not None:
            # a peer with our address registered at the same moment: neither keeps it
            self.backend.release_member(lease_id, member.instance_id)
            raise MemberConflict("advertise_url", member.instance_id, other.instance_id,
                                 other.holder())  # fmt: skip
        with self._lock:
            current = self._lease is not None and self._lease.id == lease_id
            regained = self._ever_held
            if current:
                self._held = True
                self._ever_held = True
                self._conflict = None
        if claim.created and regained:
            log.warning("member key of %s was gone; registered again", member.instance_id)
        return claim

    def _publish(self, lease_id: int, member: MemberInfo) -> None:
        """Write the member record: only over our own key, re-creating it if it went."""
        try:
            if self.backend.update_member(lease_id, member):
                return
            if not self._claim(lease_id, member).created:  # ours again meanwhile: write it
                self.backend.update_member(lease_id, member)
        except MemberConflict as exc:
            self._conflicted(exc, lease_id)

    def _check_member(self, lease_id: int) -> None:
        member = self.member
        if member is None:
            return
        try:
            self._claim(lease_id, member)
        except MemberConflict as exc:
            self._conflicted(exc, lease_id)

    def _conflicted(self, exc: MemberConflict, lease_id: int) -> None:
        if not self.is_current(lease_id):
            # written under a lease since replaced (lost, then granted again while another
            # thread still wrote under the old one): the key is ours under the new lease
            log.info("member write under replaced lease %x ignored", lease_id)
            return
        with self._lock:
            new = self._conflict is None or str(self._conflict) != str(exc)
            self._conflict = exc
            self._held = False
        if new:
            log.error("member key conflict: %s", exc)
            if self._on_conflict is not None:
                self._on_conflict(exc)

    # -- the lease -------------------------------------------------------------------------

    def _grant(self, claim: bool = True) -> Lease:
        lease = retry.backend_call(
            lambda: self.backend.lease_grant(self.ttl),
            deadline=self._clock() + self.ttl,
            stop=self._stop,
        )
        with self._lock:
            self._lease = lease
            self._held = False
        log.info("session lease %x granted (ttl %d)", lease.id, lease.ttl)
        if claim:
            try:
                self._check_member(lease.id)
            finally:
                self._granted.set()
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
                            self._held = False
                    self._granted.clear()
                    continue
                else:
                    self._granted.set()
                    self._check_member(lease.id)
            except BackendUnavailable as exc:
                log.warning("session keep-alive failed: %s", exc)
                self._stop.wait(min(1.0, self.interval / 2))
                continue
            self._stop.wait(self.interval)
