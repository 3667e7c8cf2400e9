"""The dispatcher's errors: one tree under the project's root, and ``ced``'s exit codes.

Every error the dispatcher raises on purpose is a :class:`CtrlExecError` (the root the
agent already has, :mod:`agent.common.errors`). The classes live beside the code that
raises them; this tree is the map (``cluster`` keeps its own root,
:class:`cluster.errors.ClusterError`, since it may not import ``agent``)::

    CtrlExecError                      agent.common.errors
    +-- ConfigError                    agent.common.errors: a config file is wrong (file:line)
    +-- ProtocolError                  agent.common.errors: a peer broke the protocol
    |   +-- ResponseTooLarge, HandshakeRefused        dispatcher.client.wire
    |   +-- ProxyProtocolError (also ValueError)      dispatcher.api.proxyproto
    +-- UsageError                     here: a bad ``ced`` invocation
    +-- Fail                           here: a ``ced`` verb failed; operator text, exit code
    +-- RegistryError                  dispatcher.registry: unknown agent, bad record or field
    +-- Denied                         dispatcher.operations: the auth hook refused
    +-- RunStoreError                  dispatcher.runstore
    +-- PKIError                       dispatcher.pki.ca
    +-- RenewError                     dispatcher.pki.renewal
    +-- RotationError                  dispatcher.pki.rotation
    +-- PairingQueueError              dispatcher.pairing.queue
    |   +-- QueueFull, NoSuchRequest
    +-- ManifestError (also ValueError)           dispatcher.ha.manifest
    +-- SyncError                      dispatcher.ha.sync.state: a generation cannot be applied now
    +-- RequestFailed                  dispatcher.ha.leader_requests: no leader result
    +-- ActionFailed                   dispatcher.ha.actions: a leader-only action refused/failed
    +-- NotAcknowledged                dispatcher.ha.replication: too few members applied it
    +-- LeaderOnlyRefused              here: the HA layer refused a leader-only change
        +-- NotLeaderError             this instance does not lead (also cluster NotLeader)
        +-- ClusterUnavailableError    the store is unreachable (also cluster BackendUnavailable)

    ClusterError                       cluster.errors (cluster imports neither agent nor
    +-- LockConflict                   cluster.locks: host:script already running (re-exported
    |                                  by dispatcher.runlocks; one class for every lock path)
    +-- NotLeader, Fenced, BackendUnavailable, StaleEpoch

``ced`` maps both trees to :class:`ExitCode` in one table (:mod:`dispatcher.ced.main`).
"""

from __future__ import annotations

from enum import IntEnum

from agent.common.errors import ConfigError, CtrlExecError, ProtocolError
from cluster.errors import BackendUnavailable, NotLeader

__all__ = [
    "ClusterUnavailableError",
    "ConfigError",
    "CtrlExecError",
    "ExitCode",
    "Fail",
    "LeaderOnlyRefused",
    "NotLeaderError",
    "ProtocolError",
    "UsageError",
]


class ExitCode(IntEnum):
    """Process exit statuses of ``ced`` (upstream's contract, spec 1.2)."""

    OK = 0
    #: upstream's generic failure: a host failed, the auth hook denied, a lock conflict,
    #: a failed operation (the lock conflict's "code 4" is a JSON field, not the status)
    FAILURE = 1
    #: invocation or configuration error (upstream ``die``s, which gives 255)
    USAGE = 2
    #: ``ced wait``: timed out with hosts still pending (upstream's 2)
    PENDING = 2
    #: EX_CONFIG (sysexits.h): a daemon's fatal configuration error, which systemd must not
    #: restart (``RestartPreventExitStatus=78``); ``ced`` reports config errors as USAGE
    CONFIG = 78
    #: SIGINT (128 + 2)
    INTERRUPTED = 130


class UsageError(CtrlExecError):
    """A bad ``ced`` invocation: message to stderr, exit :attr:`ExitCode.USAGE`."""


class Fail(CtrlExecError):
    """A ``ced`` verb failed: the message (operator text) to stderr, exit ``code``."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.code = code


class LeaderOnlyRefused(CtrlExecError):
    """A leader-only change (shared state, signing) cannot be made here, now."""


class NotLeaderError(LeaderOnlyRefused, NotLeader):
    """A leader-only effect was asked of an instance that does not lead (or no longer)."""

    def __init__(
        self, message: str, leader_id: str | None = None, leader_url: str | None = None
    ) -> None:
        super().__init__(message)
        self.leader_id = leader_id
        self.leader_url = leader_url


class ClusterUnavailableError(LeaderOnlyRefused, BackendUnavailable):
    """The coordination store (etcd) cannot be reached: leader-only work fails fast."""
