"""Errors of the HA layer, fit for an operator and for the existing error handling.

Both are also :class:`~dispatcher.registry.RegistryError`: a registry write refused on a
follower (for instance discovery caching agent tags) is then handled as a refused change
by the code that already handles those, instead of failing the request.
"""

from __future__ import annotations

from cluster.errors import BackendUnavailable, NotLeader
from dispatcher.registry import RegistryError


class NotLeaderError(NotLeader, RegistryError):
    """A leader-only effect was asked of an instance that does not lead (or no longer)."""

    def __init__(
        self, message: str, leader_id: str | None = None, leader_url: str | None = None
    ) -> None:
        super().__init__(message)
        self.leader_id = leader_id
        self.leader_url = leader_url


class ClusterUnavailableError(BackendUnavailable, RegistryError):
    """The coordination store (etcd) cannot be reached: leader-only work fails fast."""
