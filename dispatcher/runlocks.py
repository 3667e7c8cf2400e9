"""Per host:script run locks ``<locks_dir>/<host>--<script>.lock`` (spec 7.2).

Unlike upstream, which only probes, the lock is held for the whole run: take it with
``with acquire_all(locks_dir, pairs):``. All pairs or none; a conflict raises
:class:`LockConflict` listing every conflicting ``host:script``. The holder writes
``host`` and ``script`` into the file so :func:`list_held` reports the real names.

Lock files stay, except those of a run that every agent refused (a made-up script name):
:func:`discard` removes them under the ``flock``, so a caller naming a thousand made-up
scripts leaves no file behind. A process that opened a file just before it was removed
would lock an inode nobody else can find, so after taking a ``flock`` the taker checks that
the path still names the inode it locked, and tries again when it does not.

:class:`RunLocks` is the interface a cluster-wide (etcd) lock implements as well; the
conflict (:class:`~cluster.locks.LockConflict`) and the handle base
(:class:`~cluster.locks.LockHandle`) are the cluster library's, shared by every backend.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Protocol

from cluster.locks import LockConflict, LockHandle, LockUnavailable, try_flock

__all__ = [
    "HeldLocks",
    "LocalRunLocks",
    "LockConflict",
    "LockHandle",
    "LockUnavailable",
    "RunLocks",
    "acquire_all",
    "discard",
    "list_held",
    "lock_path",
]

LOCK_MODE = 0o660
_UNSAFE = re.compile(r"[^\w.-]", re.ASCII)
_LOCK_FILE = re.compile(r"(.+)--(.+)\.lock")


class RunLocks(Protocol):
    """A run-lock backend: local flock (:class:`LocalRunLocks`) or cluster-wide."""

    def acquire_all(self, pairs: list[tuple[str, str]]) -> LockHandle: ...

    def list_held(self) -> list[tuple[str, str]]: ...


def lock_path(locks_dir: str | Path, host: str, script: str) -> Path:
    """``<locks_dir>/<host>--<script>.lock`` with characters outside ``[\\w.-]`` as ``_``."""
    return Path(locks_dir) / f"{_UNSAFE.sub('_', host)}--{_UNSAFE.sub('_', script)}.lock"


def _open(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, LOCK_MODE)
    with contextlib.suppress(OSError):  # only the creator may chmod; umask may have cut bits
        if os.fstat(fd).st_mode & 0o777 != LOCK_MODE:
            os.fchmod(fd, LOCK_MODE)
    return fd


_REOPEN_TRIES = 8  # a file removed under us this many times in a row: report a conflict


def _same_file(fd: int, path: Path) -> bool:
    """True when ``path`` still names the inode open on ``fd`` (not removed or replaced)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _lock_one(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its flock, or None when someone holds it."""
    for _ in range(_REOPEN_TRIES):
        fd = _open(path)
        if not try_flock(fd):
            os.close(fd)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder removed it after we opened it: lock the new file
    return None


def discard(locks_dir: str | Path, pairs: list[tuple[str, str]]) -> int:
    """Remove the lock files of ``pairs`` that nobody holds (taking each ``flock`` first,
    so a holder's file is never removed); how many went."""
    gone = 0
    for host, script in pairs:
        path = lock_path(locks_dir, host, script)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if try_flock(fd) and _same_file(fd, path):
                path.unlink()
                gone += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return gone


class HeldLocks(LockHandle):
    """Locks held by this process (flock on open descriptors) until released."""

    def __init__(self, pairs: list[tuple[str, str]], fds: list[int]) -> None:
        self.pairs = pairs
        self._fds = fds

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)  # closing the descriptor drops the flock

    def __del__(self) -> None:
        self.release()


def acquire_all(locks_dir: str | Path, pairs: list[tuple[str, str]]) -> HeldLocks:
    """Take every host:script lock without blocking, or none (LockConflict)."""
    Path(locks_dir).mkdir(mode=0o770, parents=True, exist_ok=True)
    fds: list[int] = []
    taken: list[tuple[str, str]] = []
    conflicts: list[str] = []
    seen: set[Path] = set()
    try:
        for host, script in pairs:
            path = lock_path(locks_dir, host, script)
            if path in seen:  # same file twice would conflict with ourselves
                continue
            seen.add(path)
            fd = _lock_one(path)
            if fd is None:
                conflicts.append(f"{host}:{script}")
                continue
            fds.append(fd)
            taken.append((host, script))
        if conflicts:
            raise LockConflict(conflicts)
        for fd, (host, script) in zip(fds, taken, strict=True):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{host}\n{script}\n".encode(), 0)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return HeldLocks(taken, fds)


def _names_of(fd: int, filename: str) -> tuple[str, str] | None:
    """Host and script written by the holder, else parsed from the file name."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        lines = os.pread(fd, 4096, 0).decode().split("\n")
        if len(lines) == 3 and lines[0] and lines[1] and not lines[2]:
            return lines[0], lines[1]
    m = _LOCK_FILE.fullmatch(filename)
    return (m.group(1), m.group(2)) if m else None


def list_held(locks_dir: str | Path) -> list[tuple[str, str]]:
    """Sorted (host, script) of every lock file someone currently holds.

    Probing takes each free lock for an instant, as upstream does.
    """
    try:
        entries = sorted(os.listdir(locks_dir))
    except FileNotFoundError:
        return []
    held: list[tuple[str, str]] = []
    for name in entries:
        if not _LOCK_FILE.fullmatch(name):
            continue
        try:
            fd = os.open(Path(locks_dir) / name, os.O_RDONLY)
        except OSError:
            continue
        try:
            if try_flock(fd):
                continue
            names = _names_of(fd, name)
            if names is not None:
                held.append(names)
        finally:
            os.close(fd)
    return sorted(held, key=lambda p: f"{p[0]}:{p[1]}")


class LocalRunLocks:
    """:class:`RunLocks` on local ``flock`` files in one directory."""

    def __init__(self, locks_dir: str | Path) -> None:
        self.locks_dir = Path(locks_dir)

    def acquire_all(self, pairs: list[tuple[str, str]]) -> HeldLocks:
        return acquire_all(self.locks_dir, pairs)

    def list_held(self) -> list[tuple[str, str]]:
        return list_held(self.locks_dir)
