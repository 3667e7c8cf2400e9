"""The dispatcher's error tree (:mod:`dispatcher.errors`): one root, the HA refusals."""

from __future__ import annotations

import pytest

from agent.common.errors import CtrlExecError, ProtocolError
from cluster.errors import BackendUnavailable, ClusterError, NotLeader
from dispatcher.api.proxyproto import ProxyProtocolError
from dispatcher.client.wire import HandshakeRefused, ResponseTooLarge
from dispatcher.errors import (
    ClusterUnavailableError,
    Fail,
    LeaderOnlyRefused,
    NotLeaderError,
    UsageError,
)
from dispatcher.ha.actions import ActionFailed
from dispatcher.ha.leader_requests import RequestFailed
from dispatcher.ha.manifest import ManifestError
from dispatcher.ha.replication import NotAcknowledged
from dispatcher.ha.sync import SyncError
from dispatcher.operations import Denied
from dispatcher.pairing.queue import NoSuchRequest, PairingQueueError, QueueFull
from dispatcher.pki.ca import PKIError
from dispatcher.pki.renewal import RenewError
from dispatcher.pki.rotation import RotationError
from dispatcher.registry import RegistryError
from dispatcher.runlocks import LockConflict
from dispatcher.runstore import RunStoreError


@pytest.mark.parametrize(
    "cls",
    [RegistryError, Denied, RunStoreError, PKIError, RenewError, RotationError,
     PairingQueueError, QueueFull, NoSuchRequest, ManifestError, SyncError, RequestFailed,
     ActionFailed, NotAcknowledged, UsageError, Fail,
     LeaderOnlyRefused, NotLeaderError, ClusterUnavailableError, ResponseTooLarge,
     HandshakeRefused, ProxyProtocolError],
)  # fmt: skip
def test_every_dispatcher_error_has_the_one_root(cls: type[Exception]) -> None:
    assert issubclass(cls, CtrlExecError)


def test_the_one_lock_conflict_is_cluster_s() -> None:
    """``cluster`` may not import ``agent``: its LockConflict is a ClusterError, and ``ced``
    maps that root in the same table."""
    from cluster.errors import ClusterError
    from cluster.locks import LockConflict as ClusterLockConflict

    assert LockConflict is ClusterLockConflict and issubclass(LockConflict, ClusterError)


def test_protocol_and_value_errors_keep_their_kind() -> None:
    assert issubclass(ResponseTooLarge, ProtocolError) and issubclass(
        HandshakeRefused, ProtocolError
    )
    assert issubclass(ProxyProtocolError, ProtocolError) and issubclass(
        ProxyProtocolError, ValueError
    )
    assert issubclass(ManifestError, ValueError)


def test_ha_refusals_are_not_registry_errors() -> None:
    """Handlers catch :class:`LeaderOnlyRefused`, not a registry error they are not."""
    for cls in (NotLeaderError, ClusterUnavailableError):
        assert issubclass(cls, LeaderOnlyRefused) and issubclass(cls, ClusterError)
        assert not issubclass(cls, RegistryError)
    assert issubclass(NotLeaderError, NotLeader)
    assert issubclass(ClusterUnavailableError, BackendUnavailable)
    exc = NotLeaderError("refused", "a", "http://a:1")
    assert (str(exc), exc.leader_id, exc.leader_url) == ("refused", "a", "http://a:1")
