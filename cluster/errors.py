"""Exceptions of the coordination library (no dependency on any client library)."""

from __future__ import annotations


class ClusterError(Exception):
    """Base class of every ``cluster`` error."""


class BackendUnavailable(ClusterError):
    """The coordination store (etcd, or the local state directory) did not answer."""


class AccessDenied(BackendUnavailable):
    """The coordination store refused our credentials or our role (etcd auth).

    A :class:`BackendUnavailable` (the instance serves on as with etcd unreachable) that
    is never retried: repeating a wrong password changes nothing.
    """


class NotLeader(ClusterError):
    """A leader-only action was asked of an instance that does not hold the lease."""


class Fenced(ClusterError):
    """A leader-only effect was refused: the epoch it started under is no longer current."""

    def __init__(self, effect: str, epoch: int) -> None:
        self.effect = effect
        self.epoch = epoch
        super().__init__(f"effect {effect!r} fenced: epoch {epoch} is no longer current")


class StaleEpoch(ClusterError):
    """A peer saw a generation or order from an epoch older than the newest it knows."""

    def __init__(self, epoch: int, newest: int) -> None:
        self.epoch = epoch
        self.newest = newest
        super().__init__(f"epoch {epoch} is older than the newest seen ({newest})")


class MemberConflict(ClusterError):
    """Another live process holds this instance's member key, or advertises its address.

    ``kind`` is ``instance_id`` or ``advertise_url``; ``holder`` names the other process.
    """

    def __init__(self, kind: str, instance_id: str, holder_id: str, holder: str) -> None:
        self.kind = kind
        self.instance_id = instance_id
        self.holder_id = holder_id
        self.holder = holder
        if kind == "instance_id":
            msg = (
                f"instance_id '{instance_id}' is already a live member of this cluster "
                f"({holder}); every instance needs its own instance_id"
            )
        else:
            msg = (
                f"advertise_url of '{instance_id}' is already advertised by live member "
                f"'{holder_id}' ({holder}); two instances never advertise one address "
                "(on one host they differ by port)"
            )
        super().__init__(msg)
