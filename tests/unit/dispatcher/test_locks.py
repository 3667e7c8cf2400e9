from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dispatcher.runlocks import (
    LocalRunLocks,
    LockConflict,
    RunLocks,
    acquire_all,
    list_held,
    lock_path,
)

HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys
    for p in sys.argv[1:]:
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o660)
        fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()
    """
)

PROBE = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(1)
    sys.exit(0)
    """
)

ACQUIRER = textwrap.dedent(
    """
    import sys
    from dispatcher.runlocks import acquire_all
    held = acquire_all(sys.argv[1], [(sys.argv[2], sys.argv[3])])
    print("locked", flush=True)
    sys.stdin.readline()
    """
)

ROOT = Path(__file__).resolve().parents[3]


@contextmanager
def child(code: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A child process that holds locks until the block ends."""
    p = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "locked"
        yield p
    finally:
        p.kill()
        p.wait()


def probe_free(path: Path) -> bool:
    """True if another process can take the lock right now."""
    rc = subprocess.run([sys.executable, "-c", PROBE, str(path)], check=False).returncode
    assert rc in (0, 1)
    return rc == 0


def test_lock_path_sanitises(tmp_path: Path) -> None:
    assert lock_path(tmp_path, "web1.example", "deploy-app_2") == (
        tmp_path / "web1.example--deploy-app_2.lock"
    )
    p = lock_path(tmp_path, "../../etc", "x/y z;é")
    assert p.parent == tmp_path
    assert p.name == ".._.._etc--x_y_z__.lock"


def test_lock_really_held_until_release(tmp_path: Path) -> None:
    path = lock_path(tmp_path, "web1", "deploy")
    with acquire_all(tmp_path, [("web1", "deploy")]) as held:
        assert held.pairs == [("web1", "deploy")]
        assert not probe_free(path)
    assert probe_free(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert path.exists()  # lock files are never deleted


def test_release_is_idempotent_and_reacquire(tmp_path: Path) -> None:
    held = acquire_all(tmp_path, [("h", "s")])
    held.release()
    held.release()
    assert not held.held
    with acquire_all(tmp_path, [("h", "s")]) as again:
        assert again.held


def test_conflict_lists_every_pair_and_takes_none(tmp_path: Path) -> None:
    busy = [lock_path(tmp_path, "h1", "s"), lock_path(tmp_path, "h3", "s")]
    with child(HOLDER, *map(str, busy)):
        with pytest.raises(LockConflict) as ei:
            acquire_all(tmp_path, [("h1", "s"), ("h2", "s"), ("h3", "s")])
        assert ei.value.conflicts == ["h1:s", "h3:s"]
        assert str(ei.value) == "already running: h1:s, h3:s"
        assert probe_free(lock_path(tmp_path, "h2", "s"))  # all or none
        assert list_held(tmp_path) == [("h1", "s"), ("h3", "s")]
        with acquire_all(tmp_path, [("h2", "s")]):
            pass
    with acquire_all(tmp_path, [("h1", "s"), ("h2", "s"), ("h3", "s")]) as held:
        assert len(held.pairs) == 3


def test_conflict_with_other_dispatcher_process(tmp_path: Path) -> None:
    with child(ACQUIRER, str(tmp_path), "web--1", "deploy"):
        with pytest.raises(LockConflict) as ei:
            acquire_all(tmp_path, [("web--1", "deploy")])
        assert ei.value.conflicts == ["web--1:deploy"]
        # real names come from the holder, even with "--" in the host name
        assert list_held(tmp_path) == [("web--1", "deploy")]
    assert list_held(tmp_path) == []


def test_duplicate_pairs_do_not_conflict_with_themselves(tmp_path: Path) -> None:
    with acquire_all(tmp_path, [("h", "s"), ("h", "s"), ("h", "t")]) as held:
        assert held.pairs == [("h", "s"), ("h", "t")]


def test_list_held(tmp_path: Path) -> None:
    assert list_held(tmp_path / "missing") == []
    (tmp_path / "stale--x.lock").write_text("")
    (tmp_path / "notalock.txt").write_text("")
    mine = acquire_all(tmp_path, [("b", "s2")])
    try:
        with child(HOLDER, str(lock_path(tmp_path, "a", "s1"))):
            # the held file has no names in it: parsed from the file name
            assert list_held(tmp_path) == [("a", "s1"), ("b", "s2")]
    finally:
        mine.release()
    assert list_held(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == [
        "a--s1.lock",
        "b--s2.lock",
        "notalock.txt",
        "stale--x.lock",
    ]


def test_local_run_locks_protocol(tmp_path: Path) -> None:
    locks: RunLocks = LocalRunLocks(tmp_path / "locks")
    with locks.acquire_all([("h", "s")]):
        assert (tmp_path / "locks" / "h--s.lock").exists()
        with pytest.raises(LockConflict):
            locks.acquire_all([("h", "s")])
    assert locks.list_held() == []


def test_one_conflict_class_and_handle_base_for_every_backend(tmp_path: Path) -> None:
    import cluster.locks
    from dispatcher.ha.runlocks import HAHeldLocks

    assert LockConflict is cluster.locks.LockConflict  # local, HA and cluster conflicts alike
    for handle in (cluster.locks.ClusterHeldLocks, HAHeldLocks):
        assert issubclass(handle, cluster.locks.LockHandle)
    held = acquire_all(tmp_path, [("h", "s")])
    assert isinstance(held, cluster.locks.LockHandle)
    with held as same:
        assert same is held and held.held
    assert not held.held
