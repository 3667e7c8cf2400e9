"""``ced``'s run locks with a coordination store: the same keys as an API instance's,
bound to a lease the one-shot process grants for the run (embedded backend, TTL 1-2 s).

The embedded store's leases end with their process, not after a TTL: the expiry of a
killed ``ced``'s lease is tested on real etcd (tests/integration/test_runlock_cluster.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.backend import LocalBackend
from cluster.errors import BackendUnavailable
from cluster.locks import ClusterRunLocks, LeasedRunLocks, LockUnavailable
from cluster.session import Session
from dispatcher.ha.runlocks import CLIRunLocks, HARunLocks
from dispatcher.ha.storehealth import ClusterHealth
from dispatcher.runlocks import LocalRunLocks, LockConflict


def wait_for(cond: Callable[[], bool], timeout: float = 6.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_cli_and_instance_locks_exclude_each_other(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "state")
    cli = CLIRunLocks(LeasedRunLocks(backend, "ced@h:1", ttl=2), LocalRunLocks(tmp_path / "l1"))
    session = Session(LocalBackend(tmp_path / "state"), ttl=2).start()
    health = ClusterHealth()
    health.mark_ok()
    api = HARunLocks(ClusterRunLocks(session.backend, session, owner="i2"),
                     LocalRunLocks(tmp_path / "l2"), health)  # fmt: skip
    try:
        wait_for(lambda: session.current_lease_id() is not None)
        held = cli.acquire_all([("web1", "deploy")])
        assert held.cluster_wide
        with pytest.raises(LockConflict) as info:
            api.acquire_all([("web1", "deploy"), ("web2", "deploy")])
        assert info.value.conflicts == ["web1:deploy"]
        assert api.list_held() == [("web1", "deploy")]  # nothing of web2 was left behind
        held.release()
        assert backend.run_locks_held() == []  # released at once: the lease was revoked
        with api.acquire_all([("web1", "deploy")]) as by_api:
            assert by_api.cluster_wide
            with pytest.raises(LockConflict):
                cli.acquire_all([("web1", "deploy")])
        # a conflict leaves no lease nor key of the refused run behind
        assert backend.run_locks_held() == []
    finally:
        session.close()


def test_held_lock_outlives_its_ttl_while_kept_alive(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "state")
    leased = LeasedRunLocks(backend, "ced@h:1", ttl=1)
    held = leased.acquire_all([("web1", "deploy")])
    try:
        time.sleep(2.5)  # 2.5 TTLs: only the keep-alive keeps the key
        assert backend.run_locks_held() == [("web1", "deploy")]
        assert not held.lost
    finally:
        held.release()
    assert backend.run_locks_held() == []


class DownBackend(LocalBackend):
    def lease_grant(self, ttl: int) -> object:  # type: ignore[override]
        raise BackendUnavailable("etcd lease grant: no member answered")

    def run_locks_held(self) -> list[tuple[str, str]]:
        raise BackendUnavailable("etcd range: no member answered")


def test_store_down_runs_under_the_local_lock_alone(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    down = DownBackend(tmp_path / "state")
    cli = CLIRunLocks(LeasedRunLocks(down, "ced@h:1", ttl=2), LocalRunLocks(tmp_path / "l"))
    same_host = CLIRunLocks(LeasedRunLocks(down, "ced@h:2", ttl=2), LocalRunLocks(tmp_path / "l"))
    with cli.acquire_all([("web1", "deploy")]) as held:
        assert not held.cluster_wide
        # the local lock still serialises runs on this host
        with pytest.raises(LockConflict):
            same_host.acquire_all([("web1", "deploy")])
        assert cli.list_held() == [("web1", "deploy")]
    assert cli.list_held() == []


def test_store_down_refused_when_configured(tmp_path: Path) -> None:
    """``run_lock_without_etcd = refuse``: no run without the cluster-wide lock, on the
    CLI as on an instance, and the local lock taken first is given back."""
    down = DownBackend(tmp_path / "state")
    cli = CLIRunLocks(LeasedRunLocks(down, "ced@h:1", ttl=2), LocalRunLocks(tmp_path / "l"),
                      refuse=True)  # fmt: skip
    with pytest.raises(LockUnavailable, match="run_lock_without_etcd = refuse"):
        cli.acquire_all([("web1", "deploy")])
    health = ClusterHealth()
    health.mark_failed("connection refused")
    session = Session(LocalBackend(tmp_path / "state2"), ttl=2)  # never started: no lease
    api = HARunLocks(ClusterRunLocks(session.backend, session, owner="i1"),
                     LocalRunLocks(tmp_path / "l"), health, refuse=True)  # fmt: skip
    with pytest.raises(LockUnavailable, match="cluster unavailable: connection refused"):
        api.acquire_all([("web1", "deploy")])
    # nothing is left held: the local lock is free for the next run
    with LocalRunLocks(tmp_path / "l").acquire_all([("web1", "deploy")]):
        pass
    assert LocalRunLocks(tmp_path / "l").list_held() == []
