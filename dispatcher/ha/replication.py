"""When a leader-only change counts as acknowledged (``sync_ack``).

A change made by the leader lives in its files until followers have fetched them: a
leader that dies before any follower applied the generation carrying the change takes the
change with it. So the leader answers a state-changing action (approve, deny, unpair,
edit-agent, setup, rotate-cert, maintain that renewed or retired something) only once

* when it wrote a file that generations carry (CA material, registry, ``rotation.json``;
  not the pairing queue, which is the leader's own), a generation newer than the one
  current when the action began is published (the publisher runs as soon as no operation
  is active), and
* enough live members have applied it (their member records say so):
  ``majority`` (default): more than half of the live members, the leader included;
  ``one``: the leader and at least one other member (when there is one);
  ``none``: the leader alone (asynchronous, as before).

A member has applied a generation when its member record says so, or when it answered
the leader's push of it (:mod:`dispatcher.ha.sync.push`: it answers only once the files
are swapped in, synced, and its member record written): the answer is counted as soon as
it arrives, without waiting for the next read of the records.

Not reached within ``sync_ack_timeout`` seconds, the action fails with
:class:`NotAcknowledged`, which says how far it got. The change is not rolled back (it is
committed on the leader and its effect recorded in etcd) and keeps replicating; the
operator knows it may be lost if the leader dies now. "Live members" are the member keys
in etcd: a member that died drops out when its session lease expires (TTL), so on a
three-member cluster with one member down ``majority`` needs the leader and the other one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from agent.common.errors import CtrlExecError
from cluster.backend import MemberInfo


class NotAcknowledged(CtrlExecError):
    """The change is made on the leader but not applied by enough members in time."""


class Published(Protocol):
    @property
    def generation(self) -> int: ...

    def publish_soon(self) -> None: ...

    def ticket(self) -> int: ...

    def covered(self) -> tuple[int, int]: ...

    def covered_in(self, epoch: int) -> tuple[int, int] | None: ...


def needed(mode: str, members: int) -> int:
    """Members (the leader included) that must have applied a generation."""
    if mode == "none" or members <= 1:
        return 1
    if mode == "one":
        return 2
    return members // 2 + 1


class Replication:
    """:class:`dispatcher.core.Replication` of an instance in an etcd cluster."""

    # Reading the member records (one etcd range on a kept-alive connection, 2-3 ms):
    # every POLL_FAST s while an answer is due soon (a follower applies a generation in
    # 10-40 ms), then every POLL. A one-shot etcd watch instead costs a TLS handshake per
    # event (the stream is closed to end it), and the leader's own member record comes
    # first: two handshakes on the path of every acknowledgement, slower than this.
    POLL = 0.01
    POLL_FAST = 0.002
    FAST_FOR = 0.5  # seconds of fast polling after the generation is published
    POLL_LOCAL = 0.002  # waiting for the local publisher (no I/O)

    def __init__(
        self,
        instance_id: str,
        published: Published,
        members: Callable[[], Sequence[MemberInfo]],
        mode: str = "majority",
        timeout: float = 10.0,
        covers: Callable[[Path], bool] = lambda _p: True,
        clock: Callable[[], float] = time.monotonic,
        on_acknowledged: Callable[[int], None] = lambda _g: None,
        confirmed: Callable[[], Mapping[str, int]] = dict,
        wait_confirmed: Callable[[float], bool] | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.covers = covers  # whether a generation carries a file
        self._changes = 0
        self._lock = threading.Lock()
        self.published = published
        self.members = members  # fresh member records from the store
        self.mode = mode
        self.timeout = timeout
        self._clock = clock
        self.on_acknowledged = on_acknowledged  # recorded before the operator is answered
        # members that answered the leader's push of a generation (applied, synced, in
        # their member record): counted at once, without waiting for the next read
        self.confirmed = confirmed
        self.wait_confirmed = wait_confirmed

    @property
    def generation(self) -> int:
        return self.published.generation

    @property
    def changes(self) -> int:
        with self._lock:
            return self._changes

    def note(self, path: Path) -> None:
        """The fenced writer wrote or deleted ``path`` (its ``on_change``)."""
        if self.covers(path):
            with self._lock:
                self._changes += 1

    def acknowledge(self, after: int, epoch: int | None = None) -> int:
        """Wait until a generation carrying every write made so far is applied by the
        members ``sync_ack`` asks for; that generation.

        A generation newer than ``after`` (the one current when the action began) is not
        enough: a publish already scanning when the action wrote its files would count
        without carrying them (a new leader's first publish races the first action it
        lets in). It must be one whose scan began after the writes (:meth:`covered`), and
        with ``epoch`` (the epoch the writes were committed under) one published under
        that epoch: should this instance lose the leadership before such a generation is
        published, its writes may be wiped by the next leader's generation, and no
        generation it publishes when it leads again vouches for them (refused at once)."""
        deadline = self._clock() + self.timeout
        ticket = self.published.ticket()  # after the action's writes: they are counted
        self.published.publish_soon()
        while True:
            got = self.published.covered() if epoch is None else self.published.covered_in(epoch)
            if got is None:
                raise NotAcknowledged(
                    f"the change is made on the leader, but its leadership (epoch {epoch}) "
                    "ended before a generation carrying it was published; it may be lost"
                )
            seen, generation = got
            if seen >= ticket and generation > after:
                break
            if self._clock() > deadline:
                raise NotAcknowledged(
                    f"the change is made on the leader, but no generation carrying it was "
                    f"published within {self.timeout:g} s; it may be lost if the leader "
                    "dies now"
                )
            time.sleep(self.POLL_LOCAL)
        if self.mode == "none":
            return generation
        fast_until = self._clock() + self.FAST_FOR
        members = list(self.members())
        while True:
            live = {m.instance_id for m in members}
            pushed = {i for i, g in self.confirmed().items() if g >= generation and i in live}
            applied = sorted({m.instance_id for m in members if m.generation >= generation}
                             | pushed | {self.instance_id})  # fmt: skip
            want = needed(self.mode, max(len(members), 1))
            if len(applied) >= want:
                self.on_acknowledged(generation)
                return generation
            if self._clock() > deadline:
                raise NotAcknowledged(
                    f"generation {generation} carrying the change is applied by "
                    f"{len(applied)} of {len(members)} members ({', '.join(applied)}), "
                    f"{want} needed (sync_ack = {self.mode}) within {self.timeout:g} s; "
                    "it is made on the leader and keeps replicating, but may be lost if the "
                    "leader dies now"
                )
            pause = self.POLL_FAST if self._clock() < fast_until else self.POLL
            if self.wait_confirmed is not None and self.wait_confirmed(pause):
                continue  # a member answered a push: count again with the same records
            if self.wait_confirmed is None:
                time.sleep(pause)
            members = list(self.members())
