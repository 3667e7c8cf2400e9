"""One dispatcher instance's handles: config, state writer, registry, TLS client context.

CLI verbs, the API daemon and the cluster code all start from :func:`open_dispatcher`.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

from agent.common.records import field, record
from dispatcher.config import DEFAULT_CONFIG, DispatcherConfig, load
from dispatcher.registry import Registry
from dispatcher.statewrite import StateWriter, default_writer


class Replication(Protocol):
    @property
    def generation(self) -> int: ...

    @property
    def changes(self) -> int:
        """Writes so far to files a generation carries (a change happened when it grew)."""
        ...

    def acknowledge(self, after: int, epoch: int | None = None) -> int:
        """Wait until a generation newer than ``after`` (published under ``epoch``, the
        epoch of the writes, when given) is applied by the members the cluster's
        ``sync_ack`` asks for; that generation (raises when not)."""
        ...


if TYPE_CHECKING:  # imported where used: ``ced ping`` needs neither
    from dispatcher.runlocks import RunLocks
    from dispatcher.runoutcome import RunObserver
    from dispatcher.runstore import RunStore


@record
class Dispatcher:
    cfg: DispatcherConfig
    writer: StateWriter = field(default_factory=default_writer)
    run_locks: RunLocks | None = None
    # In a cluster: why this process must not sign now (only the leader signs), or None.
    sign_guard: Callable[[], str | None] | None = None
    # In a cluster: why the previous serial cannot be retired early yet (a member still
    # presents it), given the current serial; None when it can.
    retire_blocker: Callable[[str], str | None] | None = None
    # In a cluster: how a leader-only change becomes acknowledged (the generation carrying
    # it, applied by the members ``sync_ack`` asks for; see dispatcher.ha.replication).
    replication: Replication | None = None
    # Told the outcome of every host of every run and ping (the API daemon's metrics,
    # dispatcher.api.opsmetrics); None in ``ced``.
    observer: RunObserver | None = None

    def signing_refused(self) -> str | None:
        return self.sign_guard() if self.sign_guard is not None else None

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.cfg.registry_dir, self.writer)

    @cached_property
    def runstore(self) -> RunStore:
        from dispatcher.runstore import RunStore

        return RunStore(self.cfg.runs_dir)

    @property
    def locks(self) -> RunLocks:
        """The run locks: set by the API daemon (its session lease); else, with etcd, the
        cluster-wide locks under a lease of this process (``ced``), else local ``flock``."""
        if self.run_locks is None:
            if self.cfg.etcd_endpoints:
                from dispatcher.ha.runlocks import cli_run_locks

                self.run_locks = cli_run_locks(self.cfg)
            else:
                from dispatcher.runlocks import LocalRunLocks

                self.run_locks = LocalRunLocks(self.cfg.locks_dir)
        return self.run_locks

    def client_ctx(self) -> ssl.SSLContext:
        """mTLS client context presenting the dispatcher cert.

        Loaded once per version of the files (their inode, size and mtime): a rotation
        replaces them, so the next request loads the new pair. Loading is 2-4 ms, most of
        an API run on one agent before this cache. Rotation installs the new key and
        cert as two atomic writes; a reader caught between them sees a mismatched pair,
        so try again briefly before giving up.
        """
        import time

        from agent.common.tlsconf import client_context

        paths = (self.cfg.ca, self.cfg.cert, self.cfg.key)
        for attempt in range(5):
            before = _stamps(paths)
            cached = _CLIENT_CTX.get(paths)
            if cached is not None and before is not None and cached[0] == before:
                return cached[1]
            try:
                ctx = client_context(*paths)
            except ssl.SSLError:
                if attempt == 4:
                    raise
                time.sleep(0.05)
                continue
            if before is not None and _stamps(paths) == before:
                _CLIENT_CTX[paths] = (before, ctx)
            return ctx
        raise AssertionError("unreachable")


#: (ca, cert, key) -> (their stamps when loaded, the context)
_CLIENT_CTX: dict[tuple[str, str, str], tuple[tuple[tuple[int, ...], ...], ssl.SSLContext]] = {}


def _stamps(paths: tuple[str, ...]) -> tuple[tuple[int, ...], ...] | None:
    """(device, inode, size, mtime_ns) of each file; None if one cannot be read."""
    import os

    try:
        return tuple(
            (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, paths)
        )
    except OSError:
        return None


def open_dispatcher(path: str = DEFAULT_CONFIG, required: bool = True) -> Dispatcher:
    return Dispatcher(load(path, required=required))
